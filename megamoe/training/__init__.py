"""Training: loop, optimizer, schedules, gradient finalisation, logging."""
