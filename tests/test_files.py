import pytest

from bayling.files import write_atomically


class Unencodable(str):
    def encode(self, *args, **kwargs):
        raise RuntimeError("disk on fire")


def test_a_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "answer.txt"
    path.write_text("old")
    write_atomically(path, "百聆 new\n")
    assert path.read_text(encoding="utf-8") == "百聆 new\n"
    write_atomically(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.txt"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    path = tmp_path / "answer.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomically(path, Unencodable("new"))
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.txt"]
