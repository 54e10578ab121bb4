"""CheXpert builder with MRM's lists: a `CheXpert-v1.0-small` fixture in tmp_path (train.csv / valid.csv with the
official columns, real NIH radiographs re-encoded as JPEG at the listed paths) and MRM's list lines for those images
(copied from ../shared/data/splits/mrm/CheXpert)."""

import csv

import numpy as np
import PIL.Image
import pytest

import datasets
from datasets_scripts import TARGET_DATASETS, InvalidDataError, load_target_dataset
from datasets_scripts.chexpert import CHEXPERT_LABEL_NAMES, chexpert_value, load_chexpert
from datasets_scripts.label_ratio import select_by_ids
from datasets_scripts.mrm_lists import write_mrm_label_ids

COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
           "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
           "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
pytestmark = pytest.mark.filterwarnings("ignore:chexpert. split")  # a few images leave classes without positives
P = "CheXpert-v1.0-small/"
TRAIN_1 = [f"{P}train/patient09193/study2/view1_frontal.jpg 0 0 0 1 1",
           f"{P}train/patient59013/study1/view1_frontal.jpg 1 0 0 0 0",
           f"{P}train/patient00114/study12/view1_frontal.jpg 0 0 0 1 0",
           f"{P}train/patient01547/study7/view2_lateral.jpg 0 0 1 0 1"]
TRAIN_10 = [f"{P}train/patient32322/study5/view1_frontal.jpg 1 0 0 0 1",
            f"{P}train/patient34164/study2/view2_lateral.jpg 0 0 1 0 0",
            f"{P}train/patient00114/study12/view1_frontal.jpg 0 0 0 1 0"]
VAL = [f"{P}train/patient63227/study1/view1_frontal.jpg 0 0 0 0 0",
       f"{P}train/patient36912/study8/view1_frontal.jpg 0 1 0 1 1"]
TEST = [f"{P}valid/patient64541/study1/view1_frontal.jpg 0 1 0 0 0",
        f"{P}valid/patient64542/study1/view1_frontal.jpg 0 0 0 0 0",
        f"{P}valid/patient64542/study1/view2_lateral.jpg 0 0 0 0 0"]
# train.csv images in no list, with uncertain cells; expected labels by hand under U-Ones (Atelectasis, Edema,
# Pleural Effusion) / U-Zeros (Cardiomegaly, Consolidation), blank = 0:
UNLISTED = {f"{P}train/patient00001/study1/view1_frontal.jpg": (["-1.0", "-1.0", "1.0", "", "-1.0"], [1, 0, 1, 0, 1]),
            f"{P}train/patient00002/study2/view2_lateral.jpg": (["0.0", "1.0", "-1.0", "-1.0", ""], [0, 1, 0, 1, 0])}


def _entries(lines):
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines}


def _cells(labels, k):
    """CSV cells that give `labels` under MRM's policy, with uncertain cells wherever the policy allows."""
    out = []
    for i, (name, y) in enumerate(zip(CHEXPERT_LABEL_NAMES, labels)):
        ones = name in ("Atelectasis", "Edema", "Pleural Effusion")
        if y == 1:
            out.append("-1.0" if ones and (i + k) % 2 == 0 else "1.0")
        else:
            out.append("-1.0" if not ones and (i + k) % 2 == 0 else "" if (i + k) % 3 == 0 else "0.0")
    return out


def _write_table(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in COLUMNS if c in rows[0]])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def chex(shared_data_dir, tmp_path):
    root = tmp_path / "chexpert"
    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))
    listed = {**_entries(TRAIN_1), **_entries(TRAIN_10), **_entries(VAL), **_entries(TEST)}
    paths = list(listed) + list(UNLISTED)
    pixels = {}
    for k, (path, source) in enumerate(zip(paths, nih)):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.open(source).convert("L").save(target, format="JPEG", quality=95)
        pixels[path] = np.asarray(PIL.Image.open(target))
    train_rows, valid_rows = [], []
    for k, path in enumerate(paths):
        cells = UNLISTED[path][0] if path in UNLISTED else _cells(listed[path], k)
        if "/valid/" in path:
            cells = [str(float(v)) for v in listed[path]]
        view = "Lateral" if "lateral" in path else "Frontal"
        row = {"Path": path, "Sex": "Female", "Age": "60", "Frontal/Lateral": view,
               "AP/PA": "" if "lateral" in path else "AP", "No Finding": "", **dict(zip(CHEXPERT_LABEL_NAMES, cells))}
        (valid_rows if "/valid/" in path else train_rows).append(row)
    _write_table(root / P / "train.csv", train_rows)
    _write_table(root / P / "valid.csv", valid_rows)
    split_dir = tmp_path / "splits" / "mrm" / "CheXpert"
    split_dir.mkdir(parents=True)
    for name, lines in (("train_1", TRAIN_1), ("train_10", TRAIN_10), ("val_list", VAL), ("test_list", TEST)):
        (split_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "split_dir": split_dir, "listed": listed, "pixels": pixels, "train_rows": train_rows}


def _check_split(dataset, lines):
    expected = _entries(lines)
    assert dataset["image_id"] == list(expected)  # exactly the listed images, in list order
    np.testing.assert_array_equal(np.array(dataset["labels"], np.float32),
                                  np.array(list(expected.values()), np.float32))


def test_ratio_lists_select_exactly_the_listed_images(chex, caplog):
    for ratio, lines in ((0.01, TRAIN_1), (0.1, TRAIN_10)):
        # default split_dir: <data_dir>/../splits/mrm/CheXpert
        ds = load_target_dataset("chexpert", chex["root"], label_ratio=ratio)
        _check_split(ds["train"], lines)
        _check_split(ds["validation"], VAL)
        _check_split(ds["test"], TEST)
    assert ds["train"].features["labels"] == datasets.List(datasets.Value("float32"), length=5)
    assert list(TARGET_DATASETS["chexpert"].label_names) == list(CHEXPERT_LABEL_NAMES)
    assert "differ from the split lists" not in caplog.text  # the uncertain cells resolve to the lists' labels
    row = ds["test"][2]
    assert row["patient_id"] == "patient64542" and row["image_id"].endswith("view2_lateral.jpg")
    np.testing.assert_array_equal(np.asarray(row["image"]), chex["pixels"][row["image_id"]])
    # data_dir may also be the CheXpert-v1.0-small folder itself
    again = load_chexpert(chex["root"] / P, split_dir=chex["split_dir"], label_ratio=0.1)
    assert again["train"]["image_id"] == ds["train"]["image_id"]


def test_full_training_set_without_train_list_uses_the_uncertainty_policy(chex, tmp_path):
    ds = load_chexpert(chex["root"], label_ratio=1.0)
    in_val = set(_entries(VAL))
    expected = [r["Path"] for r in chex["train_rows"] if r["Path"] not in in_val]
    assert ds["train"]["image_id"] == expected  # every train.csv image outside val_list
    labels = dict(zip(ds["train"]["image_id"], ds["train"]["labels"]))
    for path, (_, by_hand) in UNLISTED.items():
        assert labels[path] == by_hand
    for path, y in {**_entries(TRAIN_1), **_entries(TRAIN_10)}.items():
        assert labels[path] == y
    _check_split(ds["test"], TEST)
    # run_finetune --label_ids_path: MRM's 1% list as an id file selects exactly its images of the full split
    ids = write_mrm_label_ids("chexpert", chex["split_dir"], 0.01, tmp_path / "ids.json")
    assert ids == list(_entries(TRAIN_1))
    assert sorted(select_by_ids(ds["train"], tmp_path / "ids.json")["image_id"]) == sorted(ids)
    # with MRM's train_list.txt in split_dir, it is the training split
    (chex["split_dir"] / "train_list.txt").write_text("\n".join(TRAIN_10[:2]) + "\n")
    _check_split(load_chexpert(chex["root"], label_ratio=1.0)["train"], TRAIN_10[:2])


def test_uncertain_cells_and_the_list_winning(chex, caplog):
    assert [chexpert_value("-1.0", n, "x") for n in CHEXPERT_LABEL_NAMES] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [chexpert_value(v, "Edema", "x") for v in ("", "0.0", "1.0", "1", "0", "-1")] == [0, 0, 1, 1, 0, 1]
    with pytest.raises(InvalidDataError, match=r"where: column 'Edema' holds '2.0'"):
        chexpert_value("2.0", "Edema", "where")
    # train.csv says Cardiomegaly positive where MRM's list says 0: the list wins, the disagreement is logged
    rows = chex["train_rows"]
    first = TRAIN_1[0].split()[0]
    next(r for r in rows if r["Path"] == first)["Cardiomegaly"] = "1.0"
    _write_table(chex["root"] / P / "train.csv", rows)
    ds = load_chexpert(chex["root"], label_ratio=0.01)
    assert ds["train"][0]["labels"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert "1 of 9 listed rows have labels that differ from the split lists" in caplog.text


def test_errors_name_the_file_and_line(chex, tmp_path):
    root, split_dir = chex["root"], chex["split_dir"]
    with pytest.raises(ValueError, match=r"label_ratio must be one of \[0.01, 0.1, 1.0\]"):
        load_chexpert(root, label_ratio=0.05)
    # a missing image: the list file and line; skip_invalid leaves it out
    missing = root / TRAIN_1[1].split()[0]
    missing.unlink()
    with pytest.raises(InvalidDataError, match=rf"train_1.txt, line 2: image {missing} not found"):
        load_chexpert(root, label_ratio=0.01)
    partial = load_chexpert(root, label_ratio=0.01, skip_invalid=True)
    _check_split(partial["train"], [TRAIN_1[0]] + TRAIN_1[2:])
    # a list entry that is in neither table
    (split_dir / "val_list.txt").write_text(VAL[0] + f"\n{P}train/patient99999/study1/view1_frontal.jpg 0 0 0 0 1\n")
    with pytest.raises(InvalidDataError, match=r"val_list.txt, line 2: '.*patient99999.*' is in neither"):
        load_chexpert(root, label_ratio=0.1)
    (split_dir / "val_list.txt").write_text("\n".join(VAL) + "\n")
    # malformed list lines
    (split_dir / "test_list.txt").write_text(TEST[0] + "\n" + TEST[1].rsplit(" ", 1)[0] + "\n")
    with pytest.raises(InvalidDataError, match=r"test_list.txt, line 2: expected an image entry and 5 label"):
        load_chexpert(root, label_ratio=0.1)
    (split_dir / "test_list.txt").write_text(TEST[0].replace(" 1 ", " -1 ") + "\n")
    with pytest.raises(InvalidDataError, match=r"test_list.txt, line 1: labels must be 0 or 1"):
        load_chexpert(root, label_ratio=0.1)
    (split_dir / "test_list.txt").write_text("\n".join(TEST) + "\n")
    # a missing list file names it and where MRM publishes it
    (split_dir / "train_10.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_10.txt: MRM's train list .* DatasetsSplits/CheXpert/train_10"):
        load_chexpert(root, split_dir=split_dir, label_ratio=0.1)
    # a missing column of valid.csv
    rows = list(csv.DictReader(open(root / P / "valid.csv")))
    _write_table(root / P / "valid.csv", [{k: v for k, v in r.items() if k != "Edema"} for r in rows])
    with pytest.raises(InvalidDataError, match=r"valid.csv: missing column\(s\) \['Edema'\]"):
        load_chexpert(root, label_ratio=0.1)
    with pytest.raises(FileNotFoundError, match=r"no CheXpert-v1.0-small/ folder"):
        load_chexpert(tmp_path / "elsewhere")


def test_mrm_lists_partial_copy(need_shared_data, chex, tmp_path):
    """MRM's real lists (2,184 / 21,841 / 5,000 / 234 lines): with only the fixture's images present, the default is an
    error naming the first entry it cannot place (line and path); skip_invalid=True keeps exactly the entries whose
    image is here."""
    shared = need_shared_data("splits/mrm/CheXpert/train_1.txt", "splits/mrm/CheXpert/test_list.txt",
                              why="MRM's full CheXpert lists")
    split_dir = shared / "splits" / "mrm" / "CheXpert"
    with pytest.raises(InvalidDataError, match=r"train_1.txt, line 3: .*patient16559.* is in neither"):
        load_chexpert(chex["root"], split_dir=split_dir, label_ratio=0.01)
    ds = load_chexpert(chex["root"], split_dir=split_dir, label_ratio=0.01, skip_invalid=True)
    real = _entries((split_dir / "train_1.txt").read_text().splitlines())
    assert ds["train"]["image_id"] == [p for p in real if p in _entries(TRAIN_1)]
    assert all(real[r["image_id"]] == r["labels"] for r in ds["train"].select_columns(["image_id", "labels"]))
    _check_split(ds["test"], TEST)
