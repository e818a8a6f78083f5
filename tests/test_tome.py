"""ToMe as the authors released it: the bipartite split alternates over the whole sequence, prefix tokens included.

Hand-checkable cases, written from the release's description (no release code is used here):
the class token sits at sequence position 0, in set A (even positions), and never merges; so the patch tokens at odd
sequence positions (patch index 1, 3, 5, ...) are the sources and those at even positions the destinations. With a
distillation token at position 1 (set B), nothing merges into it, and the patch roles flip back.
"""

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.core.reducers import bipartite_merge, bipartite_split


def test_split_alternates_over_the_whole_sequence():
    a, b = bipartite_split(7, num_prefix=1)  # class token + 6 patches
    assert a.tolist() == [0, 2, 4, 6] and b.tolist() == [1, 3, 5]
    # as patch indices: class token protected in A; sources = patches 1, 3, 5; destinations = patches 0, 2, 4
    assert (a[1:] - 1).tolist() == [1, 3, 5] and (b - 1).tolist() == [0, 2, 4]
    a, b = bipartite_split(8, num_prefix=2)  # class + distillation token + 6 patches
    assert (a[1:] - 2).tolist() == [0, 2, 4] and (b[1:] - 2).tolist() == [1, 3, 5]


def _sequence():
    """Class token + 4 patches, 1-channel features and 2-d metrics chosen so the matches are obvious.

    A = seq 0 (cls), 2 (patch 1), 4 (patch 3); B = seq 1 (patch 0), 3 (patch 2).
    patch 1 ~ patch 0 (cos 0.995), patch 3 ~ patch 2 (cos 0.894); the class token's metric equals patch 2's, so it
    would be the best match of all if it were not protected.
    """
    x = torch.tensor([100.0, 1.0, 3.0, 5.0, 7.0]).view(1, 5, 1)
    metric = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 2.0]]).unsqueeze(0)
    return x, metric


def test_merge_one_pair_by_hand():
    x, metric = _sequence()
    red = bipartite_merge(x, metric, None, r=1, num_prefix=1)
    # patch 1 (source) merges into patch 0 (destination); patch 3 stays; output: unmerged A, then B
    assert red.pruned.tolist() == [[1]]
    assert red.kept.tolist() == [[3, 0, 2]]
    assert red.host.tolist() == [[1]]  # output patch index of patch 0
    assert red.tokens.flatten().tolist() == [7.0, 2.0, 5.0]  # (1 + 3) / 2 = 2
    assert red.size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_merge_is_size_weighted_and_capped():
    x, metric = _sequence()
    size = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0]).view(1, 5, 1)
    red = bipartite_merge(x, metric, size, r=5, num_prefix=1)  # capped at 4 // 2 = 2; the class token never merges
    assert sorted(red.pruned.flatten().tolist()) == [1, 3]
    assert red.kept.tolist() == [[0, 2]]
    assert red.host.gather(1, red.pruned.argsort(1)).tolist() == [[0, 1]]  # patch 1 -> patch 0, patch 3 -> patch 2
    # (3*1 + 1*3) / 4 = 1.5 and (1*5 + 2*7) / 3 = 19/3
    torch.testing.assert_close(red.tokens.flatten(), torch.tensor([1.5, 19 / 3]))
    assert red.size.flatten().tolist() == [4.0, 3.0]


def test_distillation_token_is_never_a_destination():
    # cls, dist, 4 patches: A = seq 0 (cls), 2 (patch 0), 4 (patch 2); B = seq 1 (dist), 3 (patch 1), 5 (patch 3)
    x = torch.tensor([100.0, 200.0, 1.0, 3.0, 5.0, 7.0]).view(1, 6, 1)
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.1, 1.0]]).unsqueeze(0)
    red = bipartite_merge(x, metric, None, r=1, num_prefix=2)
    # patch 0 equals the dist token's metric exactly, but may only go to patch 1 (cos 0.8); patch 2 -> patch 3
    # (cos 0.995) wins the single merge
    assert red.pruned.tolist() == [[2]] and red.kept.tolist() == [[0, 1, 3]] and red.host.tolist() == [[2]]
    assert red.tokens.flatten().tolist() == [1.0, 3.0, 6.0]


def test_register_tokens_are_never_merged(images):
    model = tiny_vit(reg_tokens=3)  # prefix: cls + 3 registers; A holds cls and register 2, B registers 1 and 3
    tpsvit.patch(model, "tome", r=8)
    with tpsvit.tracing(model) as trace, torch.no_grad():
        features = model.forward_features(images)
    assert features.shape[1] == 4 + 64 - 8 * 6
    first = trace.locations[0]
    # prefix of 4 tokens: patch j sits at sequence position 4 + j, so the sources are the even patches
    assert (first.pruned % 2 == 0).all() and first.pruned.shape[1] == 8
    assert (first.host >= 0).all()


@pytest.mark.parametrize("variant, parity", [({}, 1), ({"name": "deit_tiny_distilled_patch16_224"}, 0)])
def test_patched_model_merges_the_release_sources(variant, parity, images):
    model = tiny_vit(**variant)
    tpsvit.patch(model, "tome", r=5)
    with tpsvit.tracing(model) as trace, torch.no_grad():
        model(images)
    first = trace.locations[0]
    assert first.pruned.shape[1] == 5
    assert (first.pruned % 2 == parity).all()  # class token alone: odd patches merge; with a dist token: even ones
