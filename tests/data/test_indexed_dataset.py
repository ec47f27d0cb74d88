"""The .bin/.idx format: a hand-built file (bytes written here with struct, independent of the
writer) is read correctly, and the writer produces exactly those bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from megamoe.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, best_dtype

# Three documents: [5, 6, 7], [], [65000, 1]; the middle one has no sequences (Megatron
# writes empty documents that way). uint16 tokens: Megatron's dtype code 8.
DOCS = [[5, 6, 7], [], [65000, 1]]


def hand_built(prefix) -> tuple[bytes, bytes]:
    bin_bytes = struct.pack("<5H", 5, 6, 7, 65000, 1)
    idx_bytes = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code: uint16
        + struct.pack("<Q", 2)  # sequences
        + struct.pack("<Q", 4)  # document indices: documents + 1
        + struct.pack("<2i", 3, 2)  # sequence lengths, int32
        + struct.pack("<2q", 0, 6)  # byte pointers, int64
        + struct.pack("<4q", 0, 1, 1, 2)  # document indices, int64
    )
    (prefix.parent / (prefix.name + ".bin")).write_bytes(bin_bytes)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(idx_bytes)
    return bin_bytes, idx_bytes


@pytest.mark.parametrize("mmap_bin", [True, False], ids=["mmap", "no-mmap-bin-files"])
def test_reader_reads_a_hand_built_file(tmp_path, mmap_bin):
    hand_built(tmp_path / "hand")
    ds = IndexedDataset(tmp_path / "hand", mmap_bin=mmap_bin)
    assert ds.dtype == np.uint16 and len(ds) == 2 and ds.num_documents == 3
    assert ds[0].tolist() == [5, 6, 7] and ds[1].tolist() == [65000, 1]
    assert ds.get(0, offset=1).tolist() == [6, 7] and ds.get(0, 1, 1).tolist() == [6]
    assert ds.sequence_lengths.tolist() == [3, 2] and ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_pointers.tolist() == [0, 6]
    assert ds.document_indices.tolist() == [0, 1, 1, 2] and ds.document_indices.dtype == np.int64
    assert ds.num_tokens == 5
    # zero-copy: the index arrays (and with mmap the tokens) are views on the mapped files
    assert not ds.sequence_lengths.flags.owndata
    if mmap_bin:
        assert isinstance(ds[0].base, np.memmap) or not ds[0].flags.owndata
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)


def test_writer_produces_the_same_bytes(tmp_path):
    expected_bin, expected_idx = hand_built(tmp_path / "hand")
    writer = IndexedDatasetWriter(tmp_path / "written", np.uint16)
    for doc in DOCS:
        writer.add_document(np.array(doc))
    writer.finalize()
    assert (tmp_path / "written.bin").read_bytes() == expected_bin
    assert (tmp_path / "written.idx").read_bytes() == expected_idx


def test_merge_and_int32(tmp_path):
    a = IndexedDatasetWriter(tmp_path / "a", np.int32)
    a.add_document([70000, 1])
    a.finalize()
    b = IndexedDatasetWriter(tmp_path / "b", np.int32)
    b.add_document([2, 3, 4])
    b.add_document([9])
    b.finalize()
    merged = IndexedDatasetWriter(tmp_path / "m", np.int32)
    merged.add_index(tmp_path / "a")
    merged.add_index(tmp_path / "b")
    merged.finalize()
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == [[70000, 1], [2, 3, 4], [9]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3] and ds.sequence_pointers.tolist() == [0, 8, 20]
    assert (tmp_path / "m.idx").read_bytes()[17] == 4  # int32: Megatron's code 4
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32


def test_reader_rejects_bad_files(tmp_path):
    hand_built(tmp_path / "hand")
    idx = (tmp_path / "hand.idx").read_bytes()
    (tmp_path / "bad.bin").write_bytes(b"")
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + idx[8:])
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDataset(tmp_path / "bad")
    (tmp_path / "bad.idx").write_bytes(idx[:-8])
    with pytest.raises(ValueError, match="header promises"):
        IndexedDataset(tmp_path / "bad")
    (tmp_path / "bad.idx").write_bytes(idx)
    with pytest.raises(ValueError, match="truncated or mismatched"):
        IndexedDataset(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        IndexedDataset(tmp_path / "missing")
