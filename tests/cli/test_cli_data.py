"""`trustvision data` lists every dataset with its real shape and split sizes."""

from trustvision import data
from trustvision.cli import main


def test_data_lists_shapes_and_split_sizes(tmp_path, capsys):
    assert main(["data", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sizes = " / ".join(str(len(data.load("digits", split=s))) for s in data.SPLITS)
    assert sizes == "1078 / 269 / 450"
    digits_row = next(line for line in out.splitlines() if " digits " in line)
    assert "1x8x8" in digits_row and sizes in digits_row
    textures_row = next(line for line in out.splitlines() if " textures " in line)
    assert "3x32x32" in textures_row and " 8 " in textures_row
    mnist_row = next(line for line in out.splitlines() if " mnist " in line)
    assert "not on disk" in mnist_row
    for name in data.list_datasets():
        assert name in out
