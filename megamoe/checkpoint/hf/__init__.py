"""Hugging Face <-> megamoe conversion: config mapping (``config_map``), tensor names and
layouts (``tensor_map``), safetensors I/O and the streaming converters (``convert``)."""
