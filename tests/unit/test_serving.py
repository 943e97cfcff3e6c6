"""The pyfunc models of vitkit.serving on tiny models: logged, loaded back from ``runs:/`` and the
registry, fed PNG files and bytes, answering labelled predictions equal to the model's own forward;
bad input refused with one message; the scoring server answering a base64 PNG; ``vitkit.predict``
writing its CSV, COCO results and drawn boxes, and one ``error:`` line for bad input."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import signal
import subprocess
import urllib.request

import mlflow
import numpy
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from torchvision.io import encode_png

from tests.loopback import free_port, wait_for
from vitkit import predict, serving
from vitkit.data.deit_transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from vitkit.data.transforms import eval_transform
from vitkit.engine.checkpoint import save_weights
from vitkit.models.detr import DETRConfig, PostProcess, build_detr, nested_tensor_from_images
from vitkit.models.resnet import build_resnet
from vitkit.models.vit import ViTConfig, build_vit
from vitkit.tasks.classifier import classifier_predictor
from vitkit.tasks.contrastive import NORMALIZE, backbone_predictor
from vitkit.tasks.detection import detector_predictor
from vitkit.tasks.distillation import student_predictor

TRAINED = ["circle", "cross", "hexagon", "square", "star", "triangle"]  # sorted folders: the label order
DATA_CLASSES = ["circle", "square", "triangle", "star", "hexagon", "cross"]  # params.yaml's order
SIZE = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: creating an MLflow database takes seconds."""
    folder = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        mlflow.create_experiment("serving", artifact_location=(folder / "artifacts").as_uri())
        mlflow.set_experiment("serving")
        yield folder
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(
        0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def png_files(images: torch.Tensor, folder) -> list[str]:
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i}.png"
        path.write_bytes(encode_png(image).numpy().tobytes())
        paths.append(str(path))
    return paths


def log(store, model: serving.ImageModel, state: dict, meta: dict, examples, config=None, name=None):
    weights = store / f"model{len(list(store.glob('*.pt')))}.pt"
    save_weights(weights, state, meta)
    with mlflow.start_run() as run:
        serving.log_model(model, weights, examples, config or {}, name)
    return run.info.run_id


def test_teacher_loads_from_the_run_and_the_registry_and_labels_in_data_classes_order(store, images):
    torch.manual_seed(0)
    net = build_resnet("resnet18", num_classes=len(TRAINED), stem="imagenet").eval()
    meta = {"arch": "resnet18", "stem": "imagenet", "classes": TRAINED, "image_size": SIZE}
    config = {"classes": serving.display_order(TRAINED, DATA_CLASSES)}
    model = serving.ClassifierModel(classifier_predictor)
    run_id = log(store, model, net.state_dict(), meta, images[:2], config, "vitkit-teacher")

    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    paths = png_files(images, store)
    out = loaded.predict(pd.DataFrame({"path": paths}))
    assert list(out.columns) == ["label", "score", *(f"prob_{c}" for c in DATA_CLASSES)]
    with torch.no_grad():
        probs = net(eval_transform()(images)).softmax(1)
    expected = pd.DataFrame(probs.numpy(), columns=[f"prob_{c}" for c in TRAINED])
    pd.testing.assert_frame_equal(out[expected.columns], expected, check_dtype=False, atol=1e-5)
    assert out["label"].tolist() == [TRAINED[i] for i in probs.argmax(1).tolist()]
    assert torch.allclose(torch.tensor(out["score"].to_numpy()), probs.max(1).values, atol=1e-5)

    registered = mlflow.pyfunc.load_model(f"models:/vitkit-teacher@{serving.ALIAS}")
    as_bytes = registered.predict(serving.png_frame(images))
    pd.testing.assert_frame_equal(as_bytes, out)
    assert registered.metadata.get_input_schema() == serving.INPUT_SCHEMA


def test_a_new_version_moves_the_alias(store, images):
    net = build_resnet("resnet18", num_classes=2, stem="imagenet")
    meta = {"arch": "resnet18", "stem": "imagenet", "classes": ["a", "b"], "image_size": SIZE}
    model = serving.ClassifierModel(classifier_predictor)
    log(store, model, net.state_dict(), meta, images[:1], name="vitkit-x")
    second = log(store, model, net.state_dict(), meta, images[:1], name="vitkit-x")
    version = mlflow.MlflowClient().get_model_version_by_alias("vitkit-x", serving.ALIAS)
    assert int(version.version) == 2 and version.run_id == second


def test_deit_student_serves_the_mean_of_its_heads(store, images):
    torch.manual_seed(0)
    config = ViTConfig(
        img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=len(TRAINED)
    )
    vit = build_vit(config).eval()
    meta = {"classes": TRAINED, "image_size": SIZE, "vit": dataclasses.asdict(config)}
    run_id = log(store, serving.ClassifierModel(student_predictor), vit.state_dict(), meta, images[:2])
    out = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(serving.png_frame(images))
    with torch.no_grad():
        cls, dist = vit.forward_heads(build_eval_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD)(images))
    probs = ((cls + dist) / 2).softmax(1)
    assert torch.allclose(torch.tensor(out[[f"prob_{c}" for c in TRAINED]].to_numpy()), probs, atol=1e-5)


def test_ssl_backbone_serves_normalised_pooled_features(store, images):
    trunk = build_resnet("resnet18", num_classes=1, stem="imagenet")
    trunk.fc = torch.nn.Identity()
    meta = {"arch": "resnet18", "stem": "imagenet", "method": "simclr", "image_size": SIZE}
    run_id = log(store, serving.EmbeddingModel(backbone_predictor), trunk.state_dict(), meta, images[:2])
    out = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(serving.png_frame(images))
    embeddings = torch.tensor(numpy.stack(out["embedding"]))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trunk.eval()(NORMALIZE(images)), dim=1)
    assert embeddings.shape == (3, 512) and torch.allclose(embeddings, expected, atol=1e-5)


def tiny_detr() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    config = DETRConfig(
        num_classes=3, arch="resnet18", stem="imagenet", train_backbone=False, return_layer="layer3",
        hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64, dropout=0.0,
        pre_norm=False, num_queries=5, aux_loss=False, eos_coef=0.1,
    )  # fmt: skip
    meta = {
        "model": "detr",
        "config": dataclasses.asdict(config),
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "eval_size": None,
        "top_k": 100,
        "score_threshold": 0.0,
    }
    return build_detr(config, None).eval(), meta


@pytest.fixture(scope="module")
def detector_uri(store):
    net, meta = tiny_detr()
    run_id = log(
        store, serving.DetectorModel(detector_predictor), net.state_dict(), meta, [detection_images()[0]]
    )
    return f"runs:/{run_id}/model"


def detection_images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        for h, w in ((64, 48), (40, 72))
    ]


def test_detector_serves_boxes_in_pixels_with_category_names(detector_uri):
    net, _ = tiny_detr()
    images = detection_images()
    loaded = mlflow.pyfunc.load_model(detector_uri)
    out = loaded.predict(serving.png_frame(images))
    assert list(out.columns) == ["boxes", "labels", "scores", "category_ids"]
    with torch.no_grad():
        for row, image in zip(out.itertuples(), images, strict=True):
            raw = net(nested_tensor_from_images([eval_transform()(image)]))
            (expected,) = PostProcess()(raw, torch.tensor([image.shape[-2:]]))
            assert torch.allclose(torch.tensor(row.boxes), expected["boxes"], atol=1e-4)
            assert row.labels == [
                {1: "circle", 2: "square"}.get(i, str(i)) for i in expected["labels"].tolist()
            ]
    median = float(torch.tensor(out["scores"][0]).median())
    fewer = loaded.predict(serving.png_frame(images[:1]), params={"score_threshold": median})
    assert fewer["scores"][0] and min(fewer["scores"][0]) > median
    assert len(fewer["scores"][0]) < len(out["scores"][0])


@pytest.fixture(scope="module")
def teacher_uri(store, images):
    net = build_resnet("resnet18", num_classes=2, stem="imagenet")
    meta = {"arch": "resnet18", "stem": "imagenet", "classes": ["a", "b"], "image_size": SIZE}
    run_id = log(store, serving.ClassifierModel(classifier_predictor), net.state_dict(), meta, images[:1])
    return f"runs:/{run_id}/model"


def test_bad_input_is_one_message_naming_the_image(store, teacher_uri, images):
    model = mlflow.pyfunc.load_model(teacher_uri)
    (store / "notes.txt").write_text("not an image")
    gray = encode_png(images[0, :1]).numpy().tobytes()
    wide = encode_png(torch.zeros(3, SIZE, 2 * SIZE, dtype=torch.uint8)).numpy().tobytes()
    cases = {
        "notes.txt is not an image": pd.DataFrame({"path": [str(store / "notes.txt")]}),
        "missing.png does not exist": pd.DataFrame({"path": [str(store / "missing.png")]}),
        "image 0 is a 8-bit grayscale image; the model takes 8-bit RGB": pd.DataFrame({"image": [gray]}),
        "image 0 is 64x32 pixels; the model takes 32x32 RGB images": pd.DataFrame({"image": [wide]}),
        "neither of the columns 'image' (encoded image bytes) and 'path'": pd.DataFrame({"file": ["x.png"]}),
        "the input holds no image": pd.DataFrame({"path": pd.Series([], dtype=str)}),
    }
    for message, frame in cases.items():
        with pytest.raises(MlflowException, match=re.escape(message)) as caught:
            model.predict(frame)
        assert caught.value.get_http_status_code() == 400


def test_the_scoring_server_answers_a_base64_png_with_class_names(teacher_uri, images):
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(teacher_uri))
    png = base64.b64encode(encode_png(images[0]).numpy().tobytes()).decode()
    body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}
    with TestClient(app) as client:
        answer = client.post("/invocations", json=body)
        (prediction,) = answer.json()["predictions"]
        assert answer.status_code == 200 and prediction["label"] in ("a", "b")
        assert set(prediction) == {"label", "score", "prob_a", "prob_b"}
        bad = client.post(
            "/invocations", json={"dataframe_split": {"columns": ["image"], "data": [["aGk="]]}}
        )
        assert bad.status_code == 400 and "image 0 is not an image" in json.loads(bad.text)["message"]


def test_predict_writes_a_csv_for_a_classifier_and_coco_results_with_drawn_boxes_for_a_detector(
    store, teacher_uri, detector_uri, images, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    paths = png_files(images, store)
    assert predict.main([teacher_uri, *paths, "--out", str(store / "out")]) == 0
    table = pd.read_csv(store / "out/predictions.csv")
    assert table["image"].tolist() == paths and list(table.columns[1:]) == [
        "label",
        "score",
        "prob_a",
        "prob_b",
    ]

    detections = store / "detections"
    detections.mkdir()
    files = png_files(torch.stack(detection_images()[:1]), detections)
    assert predict.main([detector_uri, *files, "--out", str(detections / "out")]) == 0
    results = json.loads((detections / "out/detections.json").read_text())
    assert results and {r["image_id"] for r in results} == {0}
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "file_name"}
    drawn = (detections / "out/0.boxes.png").read_bytes()
    assert drawn.startswith(b"\x89PNG") and drawn != (detections / "0.png").read_bytes()
    capsys.readouterr()


def test_predict_bad_input_is_one_error_line_and_exit_status_2(
    store, teacher_uri, images, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    (store / "notes.txt").write_text("not an image")
    wide = store / "wide.png"
    wide.write_bytes(encode_png(torch.zeros(3, SIZE, 2 * SIZE, dtype=torch.uint8)).numpy().tobytes())
    cases = {
        "models:/vitkit-nothing@current": ("cannot load model models:/vitkit-nothing@current", []),
        teacher_uri: ("notes.txt is not an image", [str(store / "notes.txt")]),
    }
    cases["runs:/0123456789abcdef/model"] = ("cannot load model runs:/0123456789abcdef/model", [])
    for uri, (message, files) in [*cases.items(), (teacher_uri, ("is 64x32 pixels", [str(wide)]))]:
        code = predict.main([uri, *(files or png_files(images[:1], store)), "--out", str(store / "bad")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_png_from_another_folder(store, teacher_uri, images, tmp_path):
    """The real server (``--env-manager local``) started outside the project: the model needs nothing else."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONPATH": ""}
    command = ["mlflow", "models", "serve", "-m", teacher_uri, "--env-manager", "local"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(  # its own process group: the uvicorn worker it starts goes with it
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        wait_for(lambda: ping(port), 180, "mlflow models serve", log)
        png = base64.b64encode(encode_png(images[0]).numpy().tobytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png]]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            (prediction,) = json.loads(answer.read())["predictions"]
        assert prediction["label"] in ("a", "b") and set(prediction) == {"label", "score", "prob_a", "prob_b"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
