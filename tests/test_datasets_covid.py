"""COVID-19 image data collection: both classification tasks and the study set, on the real snapshot."""

import csv
import shutil

import pytest

import datasets
from datasets_scripts import (
    COVID_LABEL_NAMES,
    VIRAL_BACTERIAL_LABEL_NAMES,
    InvalidDataError,
    load_covid19_collection,
    load_covid19_studies,
)
from datasets_scripts.covid19_collection import classify_finding

VIRAL = {"COVID-19", "COVID-19, ARDS", "Varicella", "Influenza"}  # the snapshot's viral findings, by hand
BACTERIAL = {"Streptococcus", "Klebsiella", "Mycoplasma Bacterial Pneumonia", "Legionella", "E.Coli", "Bacterial"}
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
# Counts of the data `shared_data_dir` holds, as documented in its README.md: ../shared/data/README.md
# ("covid19_collection/") for the full snapshot, sample_data/README.md ("Counts") for the embedded subset.
# The tests also compute each from metadata.csv and the split lists, independently of the loaders.
COUNTS = {
    "shared": {"images": 384, "labelled": 306, "listed": 369, "bacterial": 41, "studies": 232, "studies_by_date": 150},
    "sample": {"images": 128, "labelled": 88, "listed": 123, "bacterial": 20, "studies": 68, "studies_by_date": 45},
}


@pytest.fixture(scope="module")
def covid_dir(shared_data_dir):
    return shared_data_dir / "covid19_collection"


@pytest.fixture(scope="module")
def table(covid_dir):
    with open(covid_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    seen, unique = set(), []
    for r in rows:  # first row per image file (patients 339/340 repeat 285/287's files)
        if r["filename"] not in seen:
            seen.add(r["filename"])
            unique.append(r)
    return unique


@pytest.fixture(scope="module")
def listed(shared_data_dir):
    out = {}
    for name, split in SPLIT_NAMES.items():
        for line in open(shared_data_dir / "splits" / "covid19_collection" / f"{name}.txt"):
            out[line.split()[0]] = split
    return out


@pytest.fixture(scope="module")
def covid_task(covid_dir):
    return load_covid19_collection(covid_dir, task="covid")


@pytest.fixture(scope="module")
def studies(covid_dir):
    return load_covid19_studies(covid_dir)


def _all(ds, column):
    return {s: list(ds[s][column]) for s in ds}


@pytest.fixture(scope="module")
def counts(data_source):
    return COUNTS[data_source]


def test_dedup_of_repeated_patients(table, counts):
    assert len(table) == counts["images"]  # README: 389 rows -> 384 distinct images (sample: 130 -> 128)
    assert not {r["patientid"] for r in table} & {"339", "340"}


def test_covid_task_labels_and_splits(covid_task, table, listed, counts):
    labelled = [r for r in table if r["finding"] != "todo"]
    assert sum(len(d) for d in covid_task.values()) == len(labelled) == counts["labelled"]  # images - "todo" rows
    assert covid_task["train"].features["labels"] == datasets.ClassLabel(names=["non-COVID-19", "COVID-19"])
    assert COVID_LABEL_NAMES == ("non-COVID-19", "COVID-19")
    by_file = {r["filename"]: r for r in labelled}
    for split, d in covid_task.items():
        for row in d.select_columns(["image_id", "patient_id", "labels"]):
            r = by_file[row["image_id"]]
            assert row["labels"] == int(r["finding"].startswith("COVID-19"))
            assert row["patient_id"] == r["patientid"]
            if r["original_filename"] in listed:
                assert split == listed[r["original_filename"]]
    # every listed image of the snapshot keeps the paper's split; README: 275 + 22 + 72 list entries present
    # (sample: its split lists hold only the 123 lines naming its images)
    n_listed = sum(r["original_filename"] in listed for r in table)
    assert n_listed == counts["listed"]


def test_viral_bacterial_task(covid_dir, table, counts):
    ds = load_covid19_collection(covid_dir, task="viral_bacterial")
    expected = {r["filename"]: int(r["finding"] in VIRAL) for r in table if r["finding"] in VIRAL | BACTERIAL}
    got = {row["image_id"]: row["labels"] for s in ds for row in ds[s].select_columns(["image_id", "labels"])}
    assert got == expected
    assert ds["test"].features["labels"].names == list(VIRAL_BACTERIAL_LABEL_NAMES) == ["bacterial", "viral"]
    # README: bacterial 43 rows, two of which repeat patient 287's Legionella files under patient 340
    # (sample: 22 bacterial rows, the same two repeated)
    assert sum(v == 0 for v in got.values()) == counts["bacterial"]


def test_splits_are_patient_level_and_shared_across_tasks(covid_task, studies, covid_dir):
    split_of = {}
    for ds in (covid_task, studies):
        for split, d in ds.items():
            for patient in d["patient_id"]:
                assert split_of.setdefault(patient, split) == split


def test_studies(studies, table, counts):
    assert studies["train"].features["images"] == datasets.List(datasets.Image())
    rows = [r for s in studies for r in studies[s].select_columns(["study_id", "images", "view_positions", "report"])]
    # independent grouping by (patient, date, offset), notes de-duplicated, >= 3 tokens
    groups = {}
    for r in table:
        groups.setdefault((r["patientid"], r["date"], r["offset"]), []).append(r)
    kept = [g for g in groups.values() if len(" ".join(dict.fromkeys(n["clinical_notes"].strip() for n in g if n["clinical_notes"].strip())).split()) >= 3]
    assert len(rows) == len(kept) == counts["studies"]
    assert sum(len(r["images"]) for r in rows) == sum(len(g) for g in kept)
    (study,) = [r for r in rows if r["study_id"] == "177_NA_0"]
    assert [p.filename.rsplit("/", 1)[-1] for p in study["images"]] == ["16663_1_1.jpg", "16663_1_2.jpg"]
    assert study["view_positions"] == ["PA", "L"]
    notes = [r["clinical_notes"] for r in table if r["patientid"] == "177"]
    assert study["report"] == " ".join(notes[0].split())  # the two rows' notes differ only in trailing spaces
    assert all(len(r["images"]) == len(r["view_positions"]) for r in rows)
    views = {v for r in rows for v in r["view_positions"]}
    assert views <= {"PA", "AP", "AP Supine", "L", "UNKNOWN"}
    first = studies["train"][0]
    assert first["images"][0].mode == "L"


def test_group_by_date_only(covid_dir, table, counts):
    ds = load_covid19_studies(covid_dir, group_by=("patientid", "date"))
    groups = {}
    for r in table:
        groups.setdefault((r["patientid"], r["date"]), []).append(r)
    kept = [g for g in groups.values() if len(" ".join(dict.fromkeys(n["clinical_notes"].strip() for n in g if n["clinical_notes"].strip())).split()) >= 3]
    assert sum(len(d) for d in ds.values()) == len(kept) == counts["studies_by_date"]
    with pytest.raises(ValueError, match="group_by"):
        load_covid19_studies(covid_dir, group_by=("date",))


def test_finding_vocabulary():
    assert classify_finding("Pneumonia/Viral/COVID-19", "x") == {"covid": 1, "viral_bacterial": 1}
    assert classify_finding("Pneumonia/Bacterial/Streptococcus", "x") == {"covid": 0, "viral_bacterial": 0}
    assert classify_finding("Pneumonia/Fungal/Pneumocystis", "x") == {"covid": 0, "viral_bacterial": None}
    assert classify_finding("No Finding", "x") == {"covid": 0, "viral_bacterial": None}
    assert classify_finding("todo", "x") is None
    with pytest.raises(InvalidDataError, match="x: unknown label 'Martian flu'"):
        classify_finding("Pneumonia/Martian flu", "x")


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_covid(covid_dir, tmp_path):
    with open(covid_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [next(reader) for _ in range(12)]
    root = tmp_path / "covid"
    (root / "images").mkdir(parents=True)
    col = header.index("filename")
    for r in rows:
        shutil.copy(covid_dir / "images" / r[col], root / "images" / r[col])
    _write(root / "metadata.csv", header, rows)
    return root, header, rows


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.mark.filterwarnings("ignore:covid19_collection")
def test_bad_inputs(small_covid):
    root, header, rows = small_covid
    ds = load_covid19_collection(root, split_dir=root / "none")
    n = sum(len(d) for d in ds.values())
    drop = header.index("finding")
    _write(root / "metadata.csv", header[:drop] + header[drop + 1:], [r[:drop] + r[drop + 1:] for r in rows])
    with pytest.raises(InvalidDataError, match=r"metadata\.csv: missing column\(s\) \['finding'\]"):
        load_covid19_collection(root)

    bad = [list(r) for r in rows]
    bad[3][drop] = "Martian flu"
    _write(root / "metadata.csv", header, bad)
    with pytest.raises(InvalidDataError, match=r"metadata\.csv, row 4: unknown label 'Martian flu'"):
        load_covid19_collection(root)

    _write(root / "metadata.csv", header, rows)
    victim = root / "images" / rows[5][header.index("filename")]
    content = victim.read_bytes()
    victim.unlink()
    with pytest.raises(InvalidDataError, match=rf"metadata\.csv, row 6 \({victim.name}\): image .* not found"):
        load_covid19_collection(root)
    with pytest.raises(InvalidDataError, match="not found"):
        load_covid19_studies(root)
    victim.write_bytes(content[:200])
    with pytest.raises(InvalidDataError, match=rf"row 6 .*{victim.name} is corrupt"):
        load_covid19_collection(root)
    ds = load_covid19_collection(root, split_dir=root / "none", skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == n - (rows[5][drop] != "todo")
    with pytest.raises(ValueError, match="task must be one of"):
        load_covid19_collection(root, task="pneumonia")
