"""The ImageNet folders' three decoders (common.ImageFiles): the GPU path's code run on the CPU against crops made
independently (PIL) from the parameters it drew, torchvision's own crop distribution, ImageNet's odd files, and
the tensor path against PIL."""
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import resnet18_to_mlp

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and val/ of 2 classes of JPEGs of ImageNet's kind of sizes (scaled down), and in train/ a CMYK JPEG, a
    grayscale JPEG and a PNG named .JPEG, as ImageNet's training set has."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("n01", "n02")):
            (root / split / name).mkdir(parents=True)
            for j in range(5):
                # A smooth picture (JPEG keeps it nearly exactly), its size varying as photographs' do.
                h, w = 48 + 11 * j, 64 + 5 * (4 - j)
                y, x = np.mgrid[0:h, 0:w]
                pixels = np.stack([120 + 100 * np.sin(x / (5 + c) + k) * np.cos(y / 7) for k in range(3)], -1)
                pixels = (pixels + rng.normal(0, 3, pixels.shape)).clip(0, 255).astype("uint8")
                Image.fromarray(pixels).save(root / split / name / f"{j}.JPEG", quality=95)
    odd = Image.open(root / "train" / "n01" / "0.JPEG")
    odd.convert("CMYK").save(root / "train" / "n01" / "cmyk.JPEG", quality=95)
    odd.convert("L").save(root / "train" / "n02" / "gray.JPEG", quality=95)
    odd.save(root / "train" / "n02" / "png.JPEG", format="PNG")
    return root


def files(folder, split, decode, train=None):
    return common.ImageFiles(str(folder / split), split == "train" if train is None else train, SIZE, "bilinear",
                             decode, common.Context())


def reference(path, crop=None):
    """What the documented transform gives, made with PIL alone: RandomResizedCrop's box resized bilinearly (and
    flipped), or for evaluation a resize of the short side to SIZE * 256 / 224 and the center crop. uint8 [3, S, S]."""
    image = Image.open(path).convert("RGB")
    if crop is None:
        short = round(SIZE * 256 / 224)
        w, h = image.size
        # torchvision's arithmetic: the long side int(short * long / short side), the crop's corner rounded
        image = image.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), Image.BILINEAR)
        left, top = int(round((image.size[0] - SIZE) / 2.0)), int(round((image.size[1] - SIZE) / 2.0))
        image = image.crop((left, top, left + SIZE, top + SIZE))
    else:
        top, left, height, width, flip = (int(v) for v in crop.tolist())
        image = image.crop((left, top, left + width, top + height)).resize((SIZE, SIZE), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def to_uint8(normalized):
    mean, std = (torch.tensor(v).view(3, 1, 1) * 255 for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    return normalized * std + mean


def test_gpu_path_on_the_cpu_gives_the_documented_crops(folder, capsys):
    data = files(folder, "train", "gpu")
    items = [data[i] for i in range(len(data))]
    batch = data.collate(items)
    # Baseline JPEGs travel as the file's bytes, to be decoded in the main process; the odd files decoded already.
    odd = {"cmyk.JPEG": "a JPEG of 4 components", "gray.JPEG": "a JPEG of 1 components", "png.JPEG": "not a JPEG"}
    for (image, _, _, path, note) in items:
        name = path.rsplit("/", 1)[-1]
        assert (image.dim() == 3) == (name in odd)
        assert note == (f"decoded on the CPU ({odd[name]}): {path}" if name in odd else "")
    images = data.prepare(batch, torch.device("cpu"))
    assert images.shape == (len(items), 3, SIZE, SIZE) and images.dtype == torch.float32
    for image, crop, path in zip(images, batch[2], batch[3]):
        difference = (to_uint8(image) - reference(path, crop).float()).abs()
        # Bilinear resampling, torch's antialiased kernel against PIL's: within a few levels of 255 on average.
        assert difference.mean() < 3.0, path
    log = capsys.readouterr().out
    assert all(log.count(f"({why}): ") == 1 for why in odd.values())  # each odd file named once
    data.prepare(batch, torch.device("cpu"))
    assert capsys.readouterr().out == ""  # and only the first time


def test_gpu_path_takes_a_batch_without_a_jpeg_for_nvjpeg(folder):
    data = files(folder, "train", "gpu")
    odd = [data[i] for i in range(len(data)) if data.path(i).endswith(("cmyk.JPEG", "gray.JPEG", "png.JPEG"))]
    assert len(odd) == 3
    images = data.prepare(data.collate(odd), torch.device("cpu"))
    for image, (_, _, crop, path, _) in zip(images, odd):
        assert (to_uint8(image) - reference(path, crop).float()).abs().mean() < 3.0, path


def documented_crop(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's parameters as torchvision documents the algorithm, written out: up to 10 draws of an area
    fraction uniform in scale and a log-uniform aspect ratio, the first that fits; else the whole image's center,
    its ratio clamped to the range. Returns (area fraction, width / height)."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return h * w / (height * width), w / h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return h * w / (height * width), w / h


def test_crop_parameters_follow_random_resized_crop(folder):
    data = files(folder, "train", "gpu")
    draws = [data[i % len(data), i // len(data)] for i in range(800)]  # each image over many epochs
    sizes = {data.path(i): Image.open(data.path(i)).size for i in range(len(data))}
    rng = np.random.default_rng(0)
    ours, documented = [], []
    for _, _, (top, left, h, w, flip), path, _ in draws:
        width, height = sizes[path]
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        ours.append((h * w / (height * width), w / h))
        documented.append(documented_crop(height, width, rng))
    ours, documented = np.array(ours), np.array(documented)
    # The same distribution: area fractions and log aspect ratios, mean and spread, and the flips' half.
    for column, f in ((0, lambda v: v), (1, np.log)):
        assert f(ours[:, column]).mean() == pytest.approx(f(documented[:, column]).mean(), abs=0.03)
        assert f(ours[:, column]).std() == pytest.approx(f(documented[:, column]).std(), abs=0.03)
    assert ours[:, 0].min() >= 0.07 and ours[:, 0].max() <= 1.0
    assert np.mean([flip for _, _, (*_, flip), _, _ in draws]) == pytest.approx(0.5, abs=0.06)


def test_evaluation_resizes_and_crops_the_center(folder):
    for decode in ("gpu", "cpu"):
        data = files(folder, "val", decode)
        batch = data.collate([data[i] for i in range(len(data))])
        for image, path in zip(data.prepare(batch, torch.device("cpu")), batch[3]):
            assert (to_uint8(image) - reference(path).float()).abs().mean() < 3.0, (decode, path)


def test_the_tensor_path_matches_pil(folder):
    torch.manual_seed(0)
    model = resnet18_to_mlp.load_guide("random", 2).eval()
    outputs = {}
    for decode in ("pil", "cpu"):
        data = files(folder, "val", decode)
        outputs[decode] = data.prepare(data.collate([data[i] for i in range(len(data))]), torch.device("cpu"))
    # The same images but for the resize (PIL's filter against torch's antialiased one): float noise of it.
    assert (outputs["pil"] - outputs["cpu"]).abs().mean() < 0.02
    with torch.no_grad():
        assert torch.equal(model(outputs["pil"]).argmax(1), model(outputs["cpu"]).argmax(1))
    # Training crops: a crop of the decoded image, for either path.
    for decode in ("pil", "cpu"):
        data = files(folder, "train", decode)
        image = data.prepare(data.collate([data[0]]), torch.device("cpu"))
        assert image.shape == (1, 3, SIZE, SIZE) and math.isfinite(image.sum().item())


@pytest.mark.parametrize("decode", ["gpu", "cpu", "pil"])
def test_a_truncated_file_stops_the_run_with_its_name(folder, tmp_path, decode):
    import shutil

    shutil.copytree(folder, tmp_path / "data")
    whole = (tmp_path / "data" / "train" / "n01" / "1.JPEG").read_bytes()
    (tmp_path / "data" / "train" / "n01" / "1.JPEG").write_bytes(whole[:len(whole) // 2])
    data = files(tmp_path / "data", "train", decode)
    with pytest.raises(SystemExit) as err:
        data.prepare(data.collate([data[i] for i in range(len(data))]), torch.device("cpu"))
    assert err.value.code.startswith(f"error: cannot decode {tmp_path / 'data' / 'train' / 'n01' / '1.JPEG'} (")


def test_jpeg_header():
    for mode, components in (("RGB", 3), ("L", 1), ("CMYK", 4)):
        data = io.BytesIO()
        Image.new(mode, (70, 40)).save(data, "JPEG", progressive=mode == "L")
        assert common._jpeg_header(data.getvalue()) == (40, 70, components)
    data = io.BytesIO()
    Image.new("RGB", (7, 4)).save(data, "PNG")
    assert common._jpeg_header(data.getvalue()) is None and common._jpeg_header(b"") is None


def test_a_run_says_how_it_decodes(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    resnet18_to_mlp.main(["--preset=tiny", f"--data_dir={folder}", "--decode=cpu", "--batch_size=4", "--epochs=1",
                          "--align_steps=1", "--finetune_steps=0", "--bn_recal_batches=1", "--out_dir=out"])
    log = capsys.readouterr().out
    assert f"data: 13 training and 10 validation images of 2 classes in {folder}, decoded by cpu" in log
    with pytest.raises(SystemExit, match="--decode=gpu decodes with nvjpeg on CUDA"):
        resnet18_to_mlp.main(["--preset=tiny", f"--data_dir={folder}", "--decode=gpu", "--out_dir=out2"])


def test_a_jpeg_nvjpeg_rejects_is_decoded_on_the_cpu(folder, monkeypatch, capsys):
    """--decode=gpu, its code run on the CPU: a valid JPEG that nvjpeg refuses (arithmetic coding, say) makes the
    batched decode fail; each file is then tried alone, and the one refused decoded by the CPU, named in the log."""
    import torchvision.io

    data = files(folder, "val", "gpu")
    batch = data.collate([data[i] for i in range(len(data))])
    expected = data.prepare(batch, torch.device("cpu"))
    refused = batch[0][3]
    decode_jpeg = torchvision.io.decode_jpeg

    def picky(images, *args, **kwargs):
        if any(image is refused for image in (images if isinstance(images, list) else [images])):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return decode_jpeg(images, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    capsys.readouterr()
    assert torch.equal(data.prepare(batch, torch.device("cpu")), expected)
    assert capsys.readouterr().out == f"decoded on the CPU (nvjpeg rejected it): {batch[3][3]}\n"


def test_auto_decodes_on_the_cpu_even_on_cuda(folder, capsys):
    """--decode=auto stays cpu until a GPU measurement says otherwise (docs/performance.md)."""
    cfg = common.configure(common.IMAGE_SETTINGS, [f"--data_dir={folder}", "--image_size=32"])
    train, _, _ = common.image_data(cfg, common.Context(device=torch.device("cuda")))
    assert train.decode == "cpu" and ", decoded by cpu (" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 2])
def test_an_evaluation_draws_nothing_from_the_global_generator(workers):
    """Starting a DataLoader's iterator draws a seed: the validation loader has a generator of its own, so that an
    evaluation (the guide's, or one every eval_interval steps) moves no random state a run reads afterwards."""
    train, val = common.synthetic_images(64, 40, 10, 16, seed=0)
    cfg = SimpleNamespace(batch_size=16, workers=workers, label_smoothing=0.1, preset="", dtype="float32")
    task = common.classification_task(cfg, common.Context(), train, val)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    before = torch.get_rng_state()
    task.evaluate(model), task.evaluate(model)
    assert torch.equal(torch.get_rng_state(), before)
