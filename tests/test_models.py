"""The feed-forward, convolutional and LSTM models: shapes, initialisations, and curvature products
against dense float64 matrices (the references of test_curvature.py, built without hfrun.curvature)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hfrun.curvature import CurvatureOperator
from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from hfrun.models.autoencoder import Autoencoder
from hfrun.models.cnn import ConvNet, ResNet
from hfrun.models.init import martens_sparse_weight
from hfrun.models.lstm import LSTM
from hfrun.models.mlp import MLP
from hfrun.tasks.base import Batch
from test_curvature import FAST_JV_METHODS, assert_close_matrices, dense_ggn, dense_hessian, operator_matrix


def tiny_convnet() -> nn.Module:
    return ConvNet([2, 8, 8], 3, channels=[2, 3], kernel_size=3, pool=[True, False], hidden_sizes=[4])


def tiny_resnet() -> nn.Module:
    model = ResNet([2, 6, 6], 3, widths=[2, 3], blocks_per_stage=1)
    with torch.no_grad():  # the residual branches start at zero; give them weights so that they count
        for block in model.blocks:
            block.conv2.weight.normal_(0, 0.5)
            block.conv2.bias.normal_(0, 0.5)
    return model


PROBLEMS = {  # model, input shape per case, loss, target shape per case ("class": class indices)
    "convnet": (tiny_convnet, (2, 8, 8), SoftmaxCrossEntropy(), "class"),
    "resnet": (tiny_resnet, (2, 6, 6), SoftmaxCrossEntropy(), "class"),
    "lstm": (lambda: LSTM(3, 3, hidden_size=3, num_layers=2), (4, 3), SoftmaxCrossEntropy(), "class"),
    "autoencoder": (lambda: Autoencoder(6, 6, encoder_sizes=[4], code_size=2, init="sparse", sparse_fan_in=3),
                    (6,), SigmoidCrossEntropy(), (6,)),
    "sgn_mlp": (lambda: MLP(3, 1, hidden_sizes=[4, 4], activation="sigmoid", init="normal"), (3,), SquaredError(1.0),
                (1,)),
}


def problem(name: str) -> tuple[nn.Module, object, Batch]:
    torch.manual_seed(3)
    build, input_shape, loss, target_shape = PROBLEMS[name]
    model = build().double()
    inputs = torch.randn(3, *input_shape, dtype=torch.float64)
    if target_shape == "class":
        targets = torch.tensor([0, 2, 1])
    elif isinstance(loss, SigmoidCrossEntropy):
        targets = torch.rand(3, *target_shape, dtype=torch.float64)
    else:
        targets = torch.randn(3, *target_shape, dtype=torch.float64)
    return model, loss, Batch(inputs, targets)


@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
@pytest.mark.parametrize("name", PROBLEMS)
def test_ggn_product_matches_dense_ggn(name, jv_method):
    model, loss, batch = problem(name)
    operator = CurvatureOperator(model, loss, batch, damping=0.3, jv_method=jv_method)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, loss, batch) + 0.3 * identity)


@pytest.mark.parametrize("name", PROBLEMS)
def test_hessian_product_matches_dense_hessian(name):
    model, loss, batch = problem(name)
    operator = CurvatureOperator(model, loss, batch, curvature="hessian")
    assert_close_matrices(operator_matrix(operator), dense_hessian(model, loss, batch))


def test_float32_lstm_model_products_fall_back_and_match_float64():
    """oneDNN's float32 LSTM kernel has no forward-mode derivative: products switch to the native kernel."""
    model, loss, batch = problem("lstm")
    expected = dense_ggn(model, loss, batch)
    model32 = model.float()
    operator = CurvatureOperator(model32, loss, Batch(batch.inputs.float(), batch.targets), jv_method="jvp")
    identity = torch.eye(operator.num_params)
    actual = torch.stack([operator.mv(column) for column in identity], dim=1).double()
    assert_close_matrices(actual, expected, rtol=1e-5)


def test_convnet_layer_sizes_follow_the_sgn_release():
    lenet = ConvNet([1, 28, 28], 10, channels=[6, 16], kernel_size=5, pool=[True, True], hidden_sizes=[120, 84])
    # conv6 5x5 (28→24, pool 12), conv16 5x5 (12→8, pool 4): 16·4·4 = 256 features into FC120
    assert [tuple(p.shape) for p in lenet.parameters()][::2] == [(6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120),
                                                                 (10, 84)]
    cifar = ConvNet([3, 32, 32], 10)  # conv32 (30, pool 15), conv64 (13, pool 6), conv64 (4): 64·4·4 = 1024
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cifar.layers[-3].in_features == 1024


def test_convnet_refuses_a_stack_that_shrinks_the_input_away():
    with pytest.raises(ValueError, match="shrinks the input"):
        ConvNet([1, 8, 8], 10, channels=[4, 4], kernel_size=5, pool=[True, True], hidden_sizes=[])
    with pytest.raises(ValueError, match="one true/false per conv layer"):
        ConvNet([1, 28, 28], 10, channels=[4, 4], pool=[True])


def test_resnet_starts_as_identity_blocks_and_classifies():
    model = ResNet([3, 32, 32], 10)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    first = model.blocks[0]
    stem = torch.relu(model.stem(x))
    torch.testing.assert_close(first(stem), torch.relu(stem))  # zero-initialised branch: the identity
    assert sum(p.numel() for p in model.parameters()) < 100_000


def test_martens_sparse_init_draws_columns_with_replacement_without_scaling():
    torch.manual_seed(0)
    weight = martens_sparse_weight(2000, 50, fan_in=15, coeff=1.0)
    nonzeros = (weight != 0).sum(1)
    assert nonzeros.max() <= 15
    assert (nonzeros < 15).float().mean() > 0.5  # 15 draws out of 50 with replacement repeat a column most often
    values = weight[weight != 0]
    assert abs(values.std().item() - 1.0) < 0.05  # N(0, 1), not N(0, 1/15)


def test_mlp_initialisations():
    torch.manual_seed(0)
    normal = MLP(784, 10, hidden_sizes=[200], activation="sigmoid", init="normal", init_std=1.0)
    first = normal.layers[0]
    assert abs(first.weight.std().item() - 1.0) < 0.02 and first.bias.abs().max() == 0
    sparse = MLP(784, 10, hidden_sizes=[200], init="sparse", sparse_fan_in=15)
    assert ((sparse.layers[0].weight != 0).sum(1) <= 15).all()
    with pytest.raises(ValueError, match="model.init='xavier' is unknown"):
        MLP(3, 1, init="xavier")


def test_lstm_reads_the_last_step_of_the_last_layer():
    model = LSTM(7, 10, hidden_size=5, num_layers=3)
    x = torch.randn(4, 7, 7)
    expected = model.readout(model.lstm(x)[0][:, -1])
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="sequences of shape"):
        model(torch.randn(4, 49))
