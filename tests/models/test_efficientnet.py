from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from clipforge.data.reader import iter_tar_samples
from clipforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, PreprocessConfig
from clipforge.models.efficientnet_lite import EfficientNetLite0, FusedPrefix, tf_same_pad, weights_path

DOG_CLASSES = range(151, 269)  # ImageNet-1k indices 151..268 are dog breeds


def test_state_dict_keys_match_the_pretrained_file():
    sd = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0().state_dict()
    assert set(ours) == set(sd)
    assert all(ours[k].shape == sd[k].shape for k in sd)


def test_tf_same_padding_is_asymmetric_for_stride_2():
    assert tf_same_pad((224, 224), 3, 2) == (0, 1, 0, 1)
    assert tf_same_pad((112, 112), 5, 2) == (1, 2, 1, 2)
    assert tf_same_pad((7, 7), 3, 2) == (1, 1, 1, 1)


def test_pretrained_classifies_flickr_dogs_as_dogs(flickr_test_shard):
    torch.manual_seed(0)
    net = EfficientNetLite0.pretrained()
    tf = ImageTransform(PreprocessConfig(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    dogs, others = [], []
    for s in iter_tar_samples(str(flickr_test_shard)):
        cap = s["txt"].decode().lower()
        img = tf(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        if " dog" in f" {cap}" and len(dogs) < 8:
            dogs.append(img)
        elif "dog" not in cap and "animal" not in cap and len(others) < 8:
            others.append(img)
        if len(dogs) == 8 and len(others) == 8:
            break
    with torch.inference_mode():
        pred_dogs = net(torch.stack(dogs)).argmax(-1).tolist()
        pred_others = net(torch.stack(others)).argmax(-1).tolist()
    hits = sum(p in DOG_CLASSES for p in pred_dogs)
    false = sum(p in DOG_CLASSES for p in pred_others)
    assert hits >= 6, pred_dogs  # random weights would hit ~1 in 8
    assert false <= 2, pred_others


@pytest.mark.parametrize("n_units", [17, 9, 1])
def test_bn_folded_prefix_matches_the_network(n_units):
    torch.manual_seed(0)
    net = EfficientNetLite0().eval()
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 45, 39)  # odd sizes exercise the SAME padding
    with torch.no_grad():
        ref = net.stem(x)
        for u in net.units[:n_units]:
            ref = u(ref)
        got, _ = FusedPrefix(net, n_units)(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
