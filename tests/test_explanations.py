"""Explanations: IoU of known boxes, a threshold-to-box case drawn by hand, Grad-CAM (REFERS ViT and a CNN) and
attention maps against hand computations on real radiographs, and `examples/run_explain.py` end to end on real NIH
ChestX-ray14 images with NIH's official boxes."""

import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets_scripts import NIH_LABEL_NAMES
from datasets_scripts.nih_chestxray14 import index_images, load_nih_bounding_boxes
from modeling_refers import RefersConfig, RefersForImageClassification, RefersImageProcessor
from modeling_refers.tasks.explanations import (
    attention_maps,
    best_iou,
    box_iou,
    explanation_maps,
    grad_cam_maps,
    localise,
    map_to_boxes,
    refers_target_layers,
    scale_boxes,
    summarise_ious,
    vit_reshape_transform,
)
from modeling_refers.training.trainer import processor_sizes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The rows of NIH's official BBox_List_2017.csv for the images of the 64-px sample (copied unchanged; the test
# `test_embedded_rows_are_the_official_ones` checks them against the file when ../shared/data is there).
OFFICIAL_ROWS = """Image Index,Finding Label,Bbox [x,y,w,h]
00000181_061.png,Atelectasis,209.8983051,568.714132,213.6949153,254.9152542
00000149_006.png,Atelectasis,603.6610169,460.2395557,249.4915254,90.03389831
00000211_010.png,Atelectasis,353.0847458,535.0870134,101.9661017,168.1355932
00000147_001.png,Atelectasis,617.6507937,599.2296296,100.7746032,179.8772487
00000072_000.png,Atelectasis,356.5037037,567.805291,127.8645503,82.35343915
00000211_016.png,Infiltrate,237.3079365,465.9470899,230.8063492,328.3301587
00000032_037.png,Infiltrate,339.1661376,119.1957672,172.2920635,351.0857143
00000193_019.png,Pneumonia,703.7155556,616.997934,218.4533333,249.1733333
00000150_002.png,Pneumonia,601.3968254,595.978836,215.6359788,180.9608466
"""


# ---------------------------------------------------------------------------------------------- boxes by hand
def test_iou_of_known_boxes():
    a, b = (0, 0, 4, 4), (2, 2, 6, 6)  # areas 16 and 16, overlap (2, 2)-(4, 4) = 4, union 28
    assert box_iou([a], [b])[0, 0] == pytest.approx(4 / 28)
    assert box_iou([a], [a])[0, 0] == pytest.approx(1.0)
    assert box_iou([a], [(5, 5, 7, 7)])[0, 0] == 0.0
    assert box_iou([a], [(1, 1, 3, 3)])[0, 0] == pytest.approx(4 / 16)  # inside: 4 / 16
    assert box_iou([a, b], [b, (0, 0, 2, 8)]).round(6).tolist() == [[round(4 / 28, 6), round(8 / 24, 6)],
                                                                      [1.0, 0.0]]
    assert best_iou([(5, 5, 7, 7), (2, 2, 6, 6)], a) == pytest.approx(4 / 28) and best_iou([], a) == 0.0
    with pytest.raises(ValueError, match="x_max >= x_min"):
        box_iou([(4, 0, 0, 4)], [a])


def test_iou_of_degenerate_boxes():
    # A zero-width (x_max == x_min) or zero-height box is allowed (only max < min is refused): area 0, so its
    # intersection with any box is 0 -- even a line through the middle of a box -- and its IoU is 0.
    a = (0, 0, 4, 4)
    lines = [(2, 0, 2, 4), (4, 1, 4, 3), (0, 2, 4, 2)]  # vertical through a, on a's right edge, horizontal through a
    assert box_iou(lines, [a, (1, 1, 3, 3), (3, 0, 9, 9)]).tolist() == [[0.0] * 3] * 3
    assert box_iou([a], lines).tolist() == [[0.0] * 3] and best_iou(lines, a) == 0.0
    with pytest.raises(ValueError, match="boxes_b: every box needs x_max >= x_min"):
        box_iou([a], [(2.0, 0, 1.999, 4)])
    with pytest.raises(ValueError, match="boxes_a: every box needs"):
        box_iou([(0, 3, 4, 2)], [a])


def test_threshold_to_boxes_drawn_by_hand():
    cam = np.zeros((8, 10))
    cam[1:3, 2:5] = 1.0  # a 2 x 3 blob: columns 2..4, rows 1..2 -> (2, 1, 5, 3)
    cam[6, 8] = 0.8  # one pixel -> (8, 6, 9, 7)
    cam[5, 0] = 0.4  # below the threshold after normalizing (0.4 < 0.5)
    cam[3, 5] = 0.6  # touches the blob's corner (2, 4) diagonally: 8-connected, so it widens it to (2, 1, 6, 4)
    assert map_to_boxes(cam, 0.5) == [(2.0, 1.0, 6.0, 4.0), (8.0, 6.0, 9.0, 7.0)]
    assert map_to_boxes(10 * cam + 3, 0.5) == map_to_boxes(cam, 0.5)  # normalized to [0, 1] first
    assert map_to_boxes(cam, 0.9) == [(2.0, 1.0, 5.0, 3.0)]
    assert map_to_boxes(cam, 0.3) == [(2.0, 1.0, 6.0, 4.0), (0.0, 5.0, 1.0, 6.0), (8.0, 6.0, 9.0, 7.0)]
    assert map_to_boxes(np.full((4, 4), 0.7)) == []
    with pytest.raises(ValueError, match="threshold"):
        map_to_boxes(cam, 0.0)


def test_float32_map_is_normalised_exactly_enough():
    # Grad-CAM maps are float32. Here the middle pixel lies just below the midpoint of the other two, so it is
    # below the 0.5 threshold after min-max (checked with exact fractions), but float32 arithmetic rounds its
    # normalised value up to 0.5: the map must be normalised in float64, giving one box on the last pixel only.
    cam = np.array([[0.016527636, 0.4148989, 0.8132702]], dtype=np.float32)
    low, middle, high = (Fraction(float(v)) for v in cam[0])
    assert (middle - low) / (high - low) < Fraction(1, 2)
    assert (cam[0, 1] - cam[0, 0]) / (cam[0, 2] - cam[0, 0]) == np.float32(0.5)  # what float32 would keep
    assert map_to_boxes(cam, 0.5) == [(2.0, 0.0, 3.0, 1.0)]
    assert map_to_boxes(cam.astype(np.float64), 0.5) == [(2.0, 0.0, 3.0, 1.0)]
    # an integer map is min-max normalised like the same values as floats
    ints = np.array([[0, 5, 10, 4], [0, 0, 0, 7]], dtype=np.uint8)
    assert map_to_boxes(ints, 0.5) == [(1.0, 0.0, 4.0, 2.0)] == map_to_boxes(ints.astype(np.float64), 0.5)


def test_summaries_and_scaling():
    s = summarise_ious([0.6, 0.4, 0.2, 0.55])
    assert s == {"num_boxes": 4, "mean_iou": pytest.approx(0.4375), "iou>0.5": 0.5, "iou>0.3": 0.75}
    box = {"x_min": 100.0, "y_min": 200.0, "x_max": 300.0, "y_max": 600.0}
    assert scale_boxes([box], (1024, 1024), (224, 224)) == [pytest.approx((21.875, 43.75, 65.625, 131.25))]
    assert scale_boxes([box], (1000, 500), (100, 100)) == [pytest.approx((10.0, 40.0, 30.0, 120.0))]


def test_vit_reshape_puts_patch_tokens_on_the_grid():
    tokens = torch.zeros(2, 1 + 6, 3)
    for r in range(2):
        for c in range(3):
            tokens[:, 1 + r * 3 + c] = torch.tensor([r, c, 10 * r + c], dtype=torch.float32)
    tokens[:, 0] = -1.0  # the aggregation token is dropped
    grid = vit_reshape_transform((2, 3))(tokens)
    assert grid.shape == (2, 3, 2, 3)
    assert grid[0, 2].tolist() == [[0, 1, 2], [10, 11, 12]]
    with pytest.raises(ValueError, match="9 patch tokens"):
        vit_reshape_transform((3, 3))(tokens)


# ------------------------------------------------------------------------------------------------- maps by hand
def tiny_classifier(**overrides) -> RefersForImageClassification:
    torch.manual_seed(0)
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=len(NIH_LABEL_NAMES),
                  id2label=dict(enumerate(NIH_LABEL_NAMES)), label2id={n: i for i, n in enumerate(NIH_LABEL_NAMES)},
                  problem_type="multi_label_classification")
    values.update(overrides)
    return RefersForImageClassification(RefersConfig(**values)).eval()


def hand_grad_cam(forward, layer, pixels, classes, to_grid=lambda a: a):
    """Grad-CAM by hand: activations A (B, K, h, w) of `layer`, weights = spatial mean of d logit_c / d A,
    ReLU(sum_k w_k A_k); then as pytorch-grad-cam finishes a map: min-max, bilinear resize to the input (cv2), and
    min-max again (the resized grid need not reach 0 and 1 exactly)."""
    stored = {}
    handle = layer.register_forward_hook(lambda m, i, o: stored.__setitem__("a", o))
    try:
        logits = forward(pixels)
        acts = stored["a"]
        grads = torch.autograd.grad(logits[torch.arange(len(classes)), torch.tensor(classes)].sum(), acts)[0]
    finally:
        handle.remove()
    a, g = to_grid(acts).detach(), to_grid(grads)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).numpy()

    def min_max(m):
        m = m - m.min()
        return m / (1e-7 + m.max())

    return np.stack([min_max(cv2.resize(np.float32(min_max(m)), (pixels.shape[-1], pixels.shape[-2]))) for m in cam])


def test_grad_cam_on_the_radiograph_transformer_matches_hand_computation(radiographs):
    model = tiny_classifier()
    pixels = radiographs(3, size=32)
    classes = [1, 4, 9]
    maps = grad_cam_maps(model, pixels, classes)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1.0 + 1e-6
    reference = hand_grad_cam(lambda x: model(x).logits, refers_target_layers(model)[0], pixels, classes,
                              to_grid=vit_reshape_transform((4, 4)))
    np.testing.assert_allclose(maps, reference, atol=1e-4)
    assert not np.allclose(maps[0], grad_cam_maps(model, pixels[:1], [2])[0], atol=1e-3)  # class-specific


def test_grad_cam_on_a_cnn_backbone(radiographs):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    cnn = resnet18(num_classes=3).eval()
    pixels = radiographs(2, size=64)
    maps = grad_cam_maps(cnn, pixels, [0, 2], target_layers=[cnn.layer4[-1]])
    assert maps.shape == (2, 64, 64)
    np.testing.assert_allclose(maps, hand_grad_cam(cnn, cnn.layer4[-1], pixels, [0, 2]), atol=1e-4)
    with pytest.raises(ValueError, match="target_layers"):
        grad_cam_maps(cnn, pixels, [0, 2])


@pytest.mark.parametrize("method, library_class", [("gradcam++", "GradCAMPlusPlus"), ("xgradcam", "XGradCAM")])
def test_each_cam_method_is_the_library_class(radiographs, method, library_class):
    """grad_cam_maps / explanation_maps with `method` give what pytorch-grad-cam's own class gives when driven as
    its README shows (model returning logits, target layer, reshape of the ViT tokens, ClassifierOutputTarget), and
    not plain Grad-CAM's maps."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).logits

    model = tiny_classifier()
    pixels = radiographs(3, size=32)
    classes = [1, 4, 9]
    with getattr(pytorch_grad_cam, library_class)(model=Logits(model),
                                                  target_layers=[model.base_model.layers[-1].layernorm_before],
                                                  reshape_transform=vit_reshape_transform((4, 4))) as cam:
        reference = cam(input_tensor=pixels, targets=[ClassifierOutputTarget(c) for c in classes])
    maps = grad_cam_maps(model, pixels, classes, method=method)
    np.testing.assert_allclose(maps, reference, atol=1e-5)
    np.testing.assert_allclose(explanation_maps(model, pixels, classes, method), reference, atol=1e-5)
    assert np.abs(maps - grad_cam_maps(model, pixels, classes)).max() > 0.05  # not the default method's maps


def test_attention_maps_match_the_model_attentions(radiographs):
    model = tiny_classifier()
    pixels = radiographs(2, size=32)
    before = model.config._attn_implementation
    last, rolled = attention_maps(model, pixels), attention_maps(model, pixels, rollout=True)
    assert model.config._attn_implementation == before  # restored
    # explanation_maps: "attention" is the last layer's attention, "rollout" the rollout (class-agnostic)
    by_name = explanation_maps(model, pixels, [0, 3], "attention"), explanation_maps(model, pixels, [0, 3], "rollout")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = [a.mean(dim=1) for a in model(pixels, output_attentions=True).attentions]  # (B, 17, 17) per layer
    eye = torch.eye(17)
    step = [(0.5 * a + 0.5 * eye) / (0.5 * a + 0.5 * eye).sum(-1, keepdim=True) for a in attn]
    for got, weights in ((last, attn[-1][:, 0, 1:]), (rolled, (step[1] @ step[0])[:, 0, 1:]),
                         (by_name[0], attn[-1][:, 0, 1:]), (by_name[1], (step[1] @ step[0])[:, 0, 1:])):
        for m, w in zip(got, weights.reshape(-1, 4, 4).numpy()):
            w = (w - w.min()) / (1e-7 + (w - w.min()).max())
            np.testing.assert_allclose(m, cv2.resize(np.float32(w), (32, 32)), atol=1e-5)


# --------------------------------------------------------------------------------------------- NIH boxes end to end
@pytest.fixture
def bbox_file(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(OFFICIAL_ROWS)
    return path


def test_embedded_rows_are_the_official_ones(need_shared_data):
    root = need_shared_data("nih_chestxray14_sample/BBox_List_2017.csv", why="NIH's box table")
    official = load_nih_bounding_boxes(root / "nih_chestxray14_sample")
    lines = OFFICIAL_ROWS.strip().splitlines()[1:]
    assert sorted(official) == sorted(line.split(",")[0] for line in lines)
    assert sum(map(len, official.values())) == 9


def test_localise_on_real_boxes(shared_data_dir, bbox_file):
    data_dir = shared_data_dir / "nih_chestxray14_sample"
    boxes = load_nih_bounding_boxes(data_dir, bbox_file)
    paths = index_images(data_dir)
    names = sorted(boxes)
    model = tiny_classifier()
    entries = list(localise(model, RefersImageProcessor(**processor_sizes(32)), [str(paths[n]) for n in names],
                            [boxes[n] for n in names], methods=("gradcam", "attention"), image_ids=names,
                            batch_size=4))
    assert len(entries) == 2 * len(names)
    for entry in entries:
        (truth,) = boxes[entry["image_id"]]
        # 64-px image -> 32-px input: half the sample's coordinates (the table's 1024-px ones / 32).
        assert entry["truth"] == [pytest.approx(tuple(v / 2 for v in (truth["x_min"], truth["y_min"], truth["x_max"],
                                                                       truth["y_max"])))]
        assert entry["cam"].shape == (32, 32) and entry["pixel_values"].shape == (3, 32, 32)
        assert entry["predicted"] == map_to_boxes(entry["cam"], 0.5)
        assert entry["ious"] == [pytest.approx(best_iou(entry["predicted"], entry["truth"][0]))]
    with pytest.raises(ValueError, match="no class"):
        other = tiny_classifier(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
        next(localise(other, RefersImageProcessor(**processor_sizes(32)), [str(paths[names[0]])], [boxes[names[0]]]))


def test_localise_takes_colour_images_of_any_shape(shared_data_dir):
    # A real radiograph cropped to 48 wide x 64 high, given as an (H, W, 3) array, an RGB PIL image and (H, W) grey:
    # the true box is scaled by 32/48 across and 32/64 down, and the colour copies are explained like the grey one.
    path = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))[0]
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L"))[:, 8:56]
    assert grey.shape == (64, 48)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    box = {"label": "Atelectasis", "x_min": 6.0, "y_min": 16.0, "x_max": 30.0, "y_max": 48.0}
    entries = list(localise(tiny_classifier(), RefersImageProcessor(**processor_sizes(32)),
                            [rgb, Image.fromarray(rgb, "RGB"), grey], [[box]] * 3, methods=("gradcam",)))
    assert [e["image_id"] for e in entries] == ["0", "1", "2"]
    for entry in entries:
        assert entry["truth"] == [pytest.approx((4.0, 8.0, 20.0, 24.0))]
        assert entry["predicted"] == map_to_boxes(entry["cam"], 0.5)
        np.testing.assert_allclose(entry["cam"], entries[2]["cam"], atol=1e-5)
        torch.testing.assert_close(entry["pixel_values"], entries[2]["pixel_values"])


def test_run_explain_end_to_end(shared_data_dir, bbox_file, tmp_path):
    folder = tmp_path / "clf"
    tiny_classifier().save_pretrained(folder)
    RefersImageProcessor(**processor_sizes(32)).save_pretrained(folder)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_explain
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path / "explain"
    data_dir = shared_data_dir / "nih_chestxray14_sample"
    results = run_explain.main(["--model_name_or_path", str(folder), "--data_dir", str(data_dir), "--bbox_file",
                                str(bbox_file), "--output_dir", str(out), "--methods", "gradcam", "rollout"])
    n = len(load_nih_bounding_boxes(data_dir, bbox_file))  # 9 with ../shared/data, 5 in sample_data/
    assert results["num_boxes"] == n and set(results["methods"]) == {"gradcam", "rollout"}
    lines = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    for method in ("gradcam", "rollout"):
        ious = [v for x in lines if x["method"] == method for v in x["ious"]]
        summary = results["methods"][method]["all"]
        assert summary["mean_iou"] == pytest.approx(np.mean(ious))
        assert summary["iou>0.5"] == pytest.approx(np.mean(np.asarray(ious) > 0.5))
        overlays = sorted((out / "overlays" / method).glob("*.png"))
        assert len(overlays) == n
        with Image.open(overlays[0]) as image:  # figsize (7.2, 4.0) at 100 dpi
            assert image.format == "PNG" and image.size == (720, 400)
        columns = min(4, n)
        with Image.open(out / f"explanations_{method}.png") as image:  # (2.8, 3.0) inches per cell
            assert image.size == (280 * columns, 300 * ((n + columns - 1) // columns))
    with Image.open(out / "iou.png") as image:
        assert image.format == "PNG" and image.size == (640, 360)


def test_run_explain_on_vinbigdata_radiologist_boxes(shared_data_dir, tmp_path):
    from datasets_scripts import VINBIGDATA_LABEL_NAMES

    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))
    root = tmp_path / "vin"
    (root / "train").mkdir(parents=True)
    for name, source in (("aaa", nih[0]), ("bbb", nih[1])):
        shutil.copy(source, root / "train" / f"{name}.png")
    (root / "train.csv").write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "aaa,Cardiomegaly,3,R1,16,32,48,56\naaa,Cardiomegaly,3,R2,18,30,50,58\naaa,Aortic enlargement,0,R2,28,10,40,30\n"
        "bbb,No finding,14,R1,,,,\n")
    folder = tmp_path / "clf"
    tiny_classifier(num_labels=14, id2label=dict(enumerate(VINBIGDATA_LABEL_NAMES)),
                    label2id={n: i for i, n in enumerate(VINBIGDATA_LABEL_NAMES)}).save_pretrained(folder)
    RefersImageProcessor(**processor_sizes(32)).save_pretrained(folder)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_explain
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.warns(UserWarning):
        results = run_explain.main(["--model_name_or_path", str(folder), "--dataset_name", "vinbigdata", "--data_dir",
                                    str(root), "--output_dir", str(tmp_path / "out"), "--methods", "gradcam"])
    assert results["num_images"] == 1 and results["num_boxes"] == 3  # one image with boxes, three radiologist boxes
    per_class = results["methods"]["gradcam"]["per_class"]
    assert per_class["Cardiomegaly"]["num_boxes"] == 2 and per_class["Aortic enlargement"]["num_boxes"] == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "boxes.jsonl").read_text().splitlines()]
    cardio = next(x for x in lines if x["label"] == "Cardiomegaly")
    assert cardio["truth"] == [[8.0, 16.0, 24.0, 28.0], [9.0, 15.0, 25.0, 29.0]]  # 64 px -> 32 px input: halved


def test_run_explain_refuses_missing_inputs(tmp_path, shared_data_dir):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_explain
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(FileNotFoundError, match="--model_name_or_path"):
        run_explain.main(["--model_name_or_path", str(tmp_path / "none"), "--data_dir", str(tmp_path),
                          "--output_dir", str(tmp_path / "o")])
    folder = tmp_path / "clf"
    tiny_classifier().save_pretrained(folder)
    RefersImageProcessor(**processor_sizes(32)).save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="BBox_List_2017.csv"):
        run_explain.main(["--model_name_or_path", str(folder), "--data_dir", str(tmp_path), "--output_dir",
                          str(tmp_path / "o")])
