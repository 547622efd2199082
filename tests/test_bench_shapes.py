"""The benchmark's tables of layers (``bench/shapes.py``) against the models they stand for: the
per-model totals of ``bench/report.py`` add up a table's reads, so a table must hold exactly the
model's spectral-normalized weights, each as often as the model has it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench import models, shapes


def _table(group: str) -> Counter:
    """Weight shapes of a table, with their multiplicity."""
    counts = Counter()
    for layer, count in shapes.TABLES[group]:
        counts[layer.weight_shape] += count
    return counts


@pytest.mark.parametrize("model,group", [("sngan_resnet_d", "sngan_resnet"), ("biggan128_d", "biggan128_d")])
def test_tables_hold_the_models_weights(model, group):
    """The step benchmark's models (built on the meta device) have the tables' weights."""
    with torch.device("meta"):
        net = models.MODELS[model][0]()
    weights = Counter(tuple(m.weight.shape) for m in models.sn_targets(net))
    assert weights == _table(group)


def test_biggan128_g_table():
    """BigGAN-128 G (``ajbrock/BigGAN-PyTorch``'s ``G_arch`` for 128 with G_ch=96, shared_dim=128,
    dim_z=120 split into one chunk of 20 per block and one for the first linear): 41 tensors,
    as ``shared/DESIGN.md`` §3 counts them. Built here from the architecture's channel lists,
    not from the table."""
    ch, bn_in = 96, 128 + 120 // 6  # conditional BN: the shared class embedding and a z chunk
    ins, outs = [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch], [16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]
    resolutions = [8, 16, 32, 64, 128]  # (each block upsamples 2x from 4x4)
    want = Counter({(4 * 4 * 16 * ch, 120 // 6): 1})  # Linear(20, 4*4*16ch)
    for cin, cout, res in zip(ins, outs, resolutions):
        want[(cout, cin, 3, 3)] += 1  # conv1
        want[(cout, cout, 3, 3)] += 1  # conv2
        want[(cout, cin, 1, 1)] += 1  # shortcut (every block upsamples)
        want[(cin, bn_in)] += 2  # bn1's gain and bias
        want[(cout, bn_in)] += 2  # bn2's
        if res == 64:  # self-attention (theta, phi, g, o) on the block's output
            want[(cout // 8, cout, 1, 1)] += 2
            want[(cout // 2, cout, 1, 1)] += 1
            want[(cout, cout // 2, 1, 1)] += 1
    want[(3, ch, 3, 3)] += 1  # the output conv
    assert sum(want.values()) == 41
    assert _table("biggan128_g") == want
    # 24576x20 and the twenty 148-wide linears: rows not 16-element aligned (session 22)
    layers = {layer.name for layer, _ in shapes.TABLES["biggan128_g"]}
    assert "24576x20" in layers and sum(c for layer, c in shapes.TABLES["biggan128_g"] if layer.N == 148) == 20
