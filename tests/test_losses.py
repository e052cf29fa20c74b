"""Every loss term against a value worked out by hand on tiny tensors, the objective's weighting,
and gradient flow: the student (and the hint adapter) learn, the teacher never does."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_core import models
from kd_core.losses import LOSSES, LossContext, ModelOutput, StepOutputs, build_objective
from kd_core.models.base import GapLinearClassifier, GapLinearHead
from kd_core.training import freeze

INPUT = (3, 32, 32)


def outputs(student_logits=None, teacher_logits=None, labels=None, student_features=None,
            teacher_features=None, student_model=None, teacher_model=None) -> StepOutputs:
    def fill(features, logits):
        features = features if features is not None else torch.zeros(1, 1, 1, 1)
        logits = logits if logits is not None else torch.zeros(len(features), 2)
        return features, logits

    student = ModelOutput(*fill(student_features, student_logits), student_model)
    teacher = ModelOutput(*fill(teacher_features, teacher_logits), teacher_model)
    labels = labels if labels is not None else torch.zeros(len(student.logits), dtype=torch.long)
    return StepOutputs(student, teacher, labels)


def context(student_shape, teacher_shape, student=None, teacher=None) -> LossContext:
    return LossContext(student, teacher, student_shape, teacher_shape)


# ---------------------------------------------------------------------------------------------
# each term against a hand-computed value


def test_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    per_sample = [math.log(math.e + math.e**2 + math.e**3) - 3, math.log(math.e + 2) - 1]
    loss = LOSSES.create("ce")(outputs(logits, labels=labels))["loss"]
    assert loss.item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)


def test_label_smoothing_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    smoothing = 0.3
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        log_sum = math.log(sum(math.exp(z) for z in row))
        nll = [log_sum - z for z in row]  # -log p_k
        total += (1 - smoothing) * nll[label] + smoothing / 3 * sum(nll)
    loss = LOSSES.create("ce", label_smoothing=smoothing)(outputs(logits, labels=labels))["loss"]
    assert loss.item() == pytest.approx(total / 2, abs=1e-6)


def test_label_smoothing_range():
    with pytest.raises(ValueError, match="label smoothing"):
        LOSSES.create("ce", label_smoothing=1.0)


def kl_by_hand(teacher_row, student_row, temperature):
    def softmax(row):
        exps = [math.exp(z / temperature) for z in row]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher_row), softmax(student_row)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_is_kl_teacher_student_times_t_squared(temperature):
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, -1.0]])  # second row agrees: KL 0, but counts in the mean
    expected = (kl_by_hand([2, 0], [0, 0], temperature) + 0.0) / 2 * temperature**2
    loss = LOSSES.create("kd", temperature=temperature)(outputs(student, teacher))["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_direction_and_temperature_scaling():
    student, teacher = torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[2.0, 0.0, 1.0]])
    at_1 = LOSSES.create("kd", temperature=1.0)(outputs(student, teacher))["loss"].item()
    at_2 = LOSSES.create("kd", temperature=2.0)(outputs(student, teacher))["loss"].item()
    assert at_1 == pytest.approx(kl_by_hand([2, 0, 1], [0, 1, 3], 1.0), rel=1e-5)
    assert at_2 == pytest.approx(4 * kl_by_hand([2, 0, 1], [0, 1, 3], 2.0), rel=1e-5)
    reverse = kl_by_hand([0, 1, 3], [2, 0, 1], 1.0)
    assert at_1 != pytest.approx(reverse, rel=1e-3)  # KL(teacher || student), not the other way


def test_standardized_kd_is_kd_between_z_scored_logits_by_hand():
    # row [0, 3]: mean 1.5, sample std 1.5*sqrt(2) -> z = [-1/sqrt(2), 1/sqrt(2)]; row [1, 2, 6] ->
    # mean 3, deviations [-2, -1, 3], std sqrt(14/2) = sqrt(7)
    student, teacher = torch.tensor([[0.0, 3.0]]), torch.tensor([[4.0, 0.0]])
    r = 1 / math.sqrt(2)
    loss = LOSSES.create("kd", temperature=2.0, standardize=True)(outputs(student, teacher))["loss"]
    assert loss.item() == pytest.approx(4 * kl_by_hand([r, -r], [-r, r], 2.0), rel=1e-5)
    s7 = math.sqrt(7)
    student, teacher = torch.tensor([[1.0, 2.0, 6.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    t3 = 1 / math.sqrt(3)  # [0, 0, 1]: deviations [-1/3, -1/3, 2/3], std 1/sqrt(3)
    loss = LOSSES.create("kd", temperature=1.0, standardize=True)(outputs(student, teacher))["loss"]
    assert loss.item() == pytest.approx(kl_by_hand([-1 / 3 / t3, -1 / 3 / t3, 2 / 3 / t3], [-2 / s7, -1 / s7, 3 / s7], 1.0),
                                        rel=1e-5)


def test_standardized_kd_ignores_the_scale_and_shift_of_the_logits():
    teacher = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.3, -0.2, 0.0]])
    matched = LOSSES.create("kd", temperature=2.0, standardize=True)(outputs(5 * teacher + 3, teacher))["loss"]
    plain = LOSSES.create("kd", temperature=2.0)(outputs(5 * teacher + 3, teacher))["loss"]
    assert matched.item() == pytest.approx(0.0, abs=1e-6)
    assert plain.item() > 0.1  # Hinton KD asks for the teacher's scale too


def test_standardize_reaches_the_kd_term_from_the_training_config():
    from kd_core.training import TrainConfig
    assert TrainConfig(kd_standardize=True).loss_options()["kd"] == {"temperature": 4.0, "standardize": True}
    assert TrainConfig().loss_options()["kd"]["standardize"] is False


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_kd_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        LOSSES.create("kd", temperature=temperature)


def hint(student_shape, teacher_shape, adapter_weight, spatial):
    term = LOSSES.create("feature", context=context(student_shape, teacher_shape), spatial=spatial)
    with torch.no_grad():
        term.adapter[0].weight.copy_(torch.tensor(adapter_weight, dtype=torch.float32)[:, :, None, None])
    return term.eval()  # BN with running mean 0, var 1: divides by sqrt(1 + eps)


BN_SCALE = math.sqrt(1 + 1e-5)


def test_feature_hint_pools_the_larger_student_map():
    term = hint((2, 2, 2), (3, 1, 1), [[1, 0], [0, 1], [1, 1]], "pool")
    student = torch.tensor([[[[1, 2], [3, 4]], [[0, 0], [0, 4]]],
                            [[[1, 1], [1, 1]], [[-2, -2], [-2, -2]]]], dtype=torch.float32)
    teacher = torch.tensor([[2.0, 1.0, 3.0], [0.0, 0.0, 0.0]])[:, :, None, None]
    adapted_means = [[2.5, 1.0, 3.5], [1.0, -2.0, -1.0]]  # W @ (channel means); a 1x1 conv commutes with pooling
    squares = [(a / BN_SCALE - t) ** 2 for row, trow in zip(adapted_means, teacher[:, :, 0, 0].tolist())
               for a, t in zip(row, trow)]
    loss = term(outputs(student_features=student, teacher_features=teacher))["loss"]
    assert loss.item() == pytest.approx(sum(squares) / 6, rel=1e-6)


@pytest.mark.parametrize("spatial", ["pool", "resize"])
def test_feature_hint_with_a_larger_teacher_map(spatial):
    term = hint((1, 1, 1), (2, 2, 2), [[1], [3]], spatial)
    student = torch.full((1, 1, 1, 1), 2.0)  # adapted: channel 0 = 2, channel 1 = 6 (over sqrt(1+eps))
    teacher = torch.tensor([[[[2, 2], [2, 2]], [[0, 6], [6, 6]]]], dtype=torch.float32)
    a0, a1 = 2 / BN_SCALE, 6 / BN_SCALE
    if spatial == "resize":  # the 1x1 student is stretched to 2x2
        expected = (4 * (a0 - 2) ** 2 + (a1 - 0) ** 2 + 3 * (a1 - 6) ** 2) / 8
    else:  # the teacher is averaged to 1x1: channel means 2 and 4.5
        expected = ((a0 - 2) ** 2 + (a1 - 4.5) ** 2) / 2
    loss = term(outputs(student_features=student, teacher_features=teacher))["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


class LinearCamModel(GapLinearClassifier):
    """Features are the input itself; the GAP + linear head has the given ``(K, C)`` weight."""

    def __init__(self, weight):
        super().__init__()
        weight = torch.tensor(weight, dtype=torch.float32)
        self.features = nn.Identity()
        self.head = GapLinearHead(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.fc.weight.copy_(weight)
            self.head.fc.bias.zero_()


@pytest.mark.parametrize("target, distance, expected", [
    ("teacher", "l1", (1 + 0.5 + 1 + 0) / 4),      # class 0: student [[1, .5], [0, 0]] vs teacher [[0, 0], [1, 0]]
    ("teacher", "mse", (1 + 0.25 + 1 + 0) / 4),
    ("label", "l1", (0 + 0 + 1 + 1) / 4),          # class 1: student [[0, 0], [0, 1]] vs teacher [[0, 0], [1, 0]]
])
def test_cam_alignment_by_hand(target, distance, expected):
    student = LinearCamModel([[1, 0], [0, 1]])     # class k reads channel k
    teacher = LinearCamModel([[1], [0.5]])         # both classes see the same map; class 0 wins
    student_features = torch.tensor([[[[2, 1], [0, 0]], [[0, 0], [0, 3]]]], dtype=torch.float32)
    teacher_features = torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.float32)
    term = LOSSES.create("cam", context=context((2, 2, 2), (1, 2, 2), student, teacher),
                         target=target, distance=distance)
    step = outputs(student.forward_head(student_features), teacher.forward_head(teacher_features),
                   torch.tensor([1]), student_features, teacher_features, student, teacher)
    assert step.teacher.logits.argmax(1).item() == 0
    assert term(step)["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_cam_alignment_refuses_models_without_a_map():
    mlp = models.create("mlp")
    with pytest.raises(ValueError, match="MLP has no spatial feature map"):
        LOSSES.create("cam", context=context((512, 1, 1), (32, 3, 3), mlp, models.create("camnet")))


@pytest.mark.parametrize("swap", [False, True])
def test_cosine_by_hand(swap):
    short = torch.tensor([[1.0, 0.0], [3.0, 4.0]])[:, :, None, None]
    long = torch.tensor([[0.0, 2.0, 2.0, 0.0], [3.0, 3.0, 4.0, 4.0]])[:, :, None, None]  # pooled: [1, 1], [3, 4]
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 1)) / 2
    student, teacher = (long, short) if swap else (short, long)
    loss = LOSSES.create("cosine")(outputs(student_features=student, teacher_features=teacher))["loss"]
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_attention_transfer_by_hand():
    student = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2): mean_c A^2 = [1, 0]
    teacher = torch.tensor([[[[1.0, 1.0]]]])               # (1, 1, 1, 2): [1, 1] -> [.7071, .7071]
    r = 1 / math.sqrt(2)
    loss = LOSSES.create("at")(outputs(student_features=student, teacher_features=teacher))["loss"]
    assert loss.item() == pytest.approx(((1 - r) ** 2 + r**2) / 2, abs=1e-6)


def test_attention_transfer_resizes_to_the_larger_map():
    student = torch.tensor([[[[1.0, 0.0]]]])                     # 1x2 -> stretched to rows [1, 0], [1, 0]
    teacher = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])          # 2x2
    # normalized: student [1, 0, 1, 0] / sqrt 2, teacher [1, 1, 0, 0] / sqrt 2
    loss = LOSSES.create("at")(outputs(student_features=student, teacher_features=teacher))["loss"]
    assert loss.item() == pytest.approx((0 + 0.5 + 0.5 + 0) / 4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the objective


def step_for(student, teacher, batch=4, seed=0, teacher_grad=False) -> StepOutputs:
    torch.manual_seed(seed)
    images = torch.randn(batch, *INPUT)
    labels = torch.randint(0, 10, (batch,))
    features = student.forward_features(images)
    with torch.set_grad_enabled(teacher_grad):
        teacher_features = teacher.forward_features(images)
        teacher_logits = teacher.forward_head(teacher_features)
    return StepOutputs(ModelOutput(features, student.forward_head(features), student),
                       ModelOutput(teacher_features, teacher_logits, teacher), labels)


def pair(student_name, teacher_name):
    torch.manual_seed(1)
    return models.create(student_name).train(), freeze(models.create(teacher_name))


def test_objective_is_the_weighted_sum_and_drops_zero_weights():
    student, teacher = pair("camnet", "lightnn")
    weights = {"ce": 0.3, "kd": 2.0, "at": 0.5, "cosine": 0.0}
    objective = build_objective(weights, student, teacher, INPUT, {"kd": {"temperature": 3.0}})
    assert set(objective.terms) == {"ce", "kd", "at"}
    step = step_for(student, teacher)
    result = objective(step)
    separately = {"ce": LOSSES.create("ce")(step)["loss"],
                  "kd": LOSSES.create("kd", temperature=3.0)(step)["loss"],
                  "at": LOSSES.create("at")(step)["loss"]}
    assert "cosine" not in result
    for name, value in separately.items():
        assert result[name].item() == pytest.approx(value.item(), rel=1e-6)  # parts are unweighted
    expected = 0.3 * separately["ce"] + 2.0 * separately["kd"] + 0.5 * separately["at"]
    assert result["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert result["loss"].requires_grad and not result["kd"].requires_grad


@pytest.mark.parametrize("weights, options, error, message", [
    ({"ce": 1.0, "kd": -0.5}, {}, ValueError, "--kd must not be negative"),
    ({"ce": 0.0, "kd": 0.0}, {}, ValueError, "all loss weights are zero"),
    ({"ce": 1.0, "kd": 1.0}, {"kd": {"temperature": 0.0}}, ValueError, "temperature must be positive"),
    ({"ce": 1.0, "kd": 1.0}, {"kd": {"temperature": -2.0}}, ValueError, "temperature must be positive"),
    ({"ce": 1.0, "fancy": 1.0}, {}, KeyError, "unknown loss 'fancy'"),
])
def test_objective_rejects_bad_settings(weights, options, error, message):
    student, teacher = pair("camnet", "lightnn")
    with pytest.raises(error, match=message):
        build_objective(weights, student, teacher, INPUT, options)


def test_teacher_terms_need_a_teacher():
    with pytest.raises(ValueError, match="loss terms kd need a teacher"):
        build_objective({"ce": 1.0, "kd": 1.0}, models.create("camnet"), None, INPUT)
    assert not build_objective({"ce": 1.0}, models.create("camnet"), None, INPUT).needs_teacher


# ---------------------------------------------------------------------------------------------
# gradient flow


def nonzero_grad(parameter: torch.Tensor) -> bool:
    return parameter.grad is not None and parameter.grad.abs().sum().item() > 0


FEATURE_PAIRS = [("camnet", "lightnn"),   # student (32, 3, 3), teacher (16, 8, 8): channels and size differ
                 ("lightnn", "camnet"),   # student map larger than the teacher's
                 ("resnet8", "deepnn")]   # same size, 64 vs 32 channels


@pytest.mark.parametrize("spatial", ["pool", "resize"])
@pytest.mark.parametrize("student_name, teacher_name", FEATURE_PAIRS)
def test_feature_hint_trains_student_and_adapter(student_name, teacher_name, spatial):
    student, teacher = pair(student_name, teacher_name)
    objective = build_objective({"feature": 1.0}, student, teacher, INPUT, {"feature": {"spatial": spatial}})
    loss = objective(step_for(student, teacher))["loss"]
    loss.backward()
    assert loss.item() > 0
    adapter = objective.terms["feature"].adapter[0].weight
    assert nonzero_grad(adapter)
    assert nonzero_grad(student.features[0].weight)


# the source project's feature loss was identically zero; for random inputs none of these may be
@pytest.mark.parametrize("term", ["feature", "cosine", "at", "cam", "kd"])
@pytest.mark.parametrize("student_name, teacher_name", FEATURE_PAIRS)
def test_teacher_terms_are_positive_and_train_the_backbone(term, student_name, teacher_name):
    student, teacher = pair(student_name, teacher_name)
    objective = build_objective({term: 1.0}, student, teacher, INPUT)
    loss = objective(step_for(student, teacher, seed=3))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1e-4
    assert nonzero_grad(student.features[0].weight)


@pytest.mark.parametrize("student_name, teacher_name, student_has_linear_cam", [
    ("camnet", "deepnn", True),     # GAP + linear student: the original CAM
    ("deepnn", "camnet", False),    # non-GAP students: Grad-CAM with create_graph=True
    ("lightnn", "resnet8", False),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_cam_loss_trains_the_student_not_the_teacher(student_name, teacher_name, student_has_linear_cam, autocast):
    torch.manual_seed(2)
    student = models.create(student_name).train()
    teacher = models.create(teacher_name).eval()  # left trainable on purpose: the term must detach it
    assert (student.linear_cam_weight() is not None) == student_has_linear_cam
    # Grad-CAM's ReLU zeroes a map whose class has only negative evidence (then that sample carries
    # no CAM gradient, as in the paper); the student's own top class always has a live map
    objective = build_objective({"cam": 1.0}, student, teacher, INPUT, {"cam": {"target": "label"}})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        step = step_for(student, teacher, teacher_grad=True)
        step.labels = step.student.logits.argmax(1)
        loss = objective(step)["loss"]
    loss.backward()
    assert loss.item() > 0
    assert nonzero_grad(student.features[0].weight)
    # the CAM depends on the head too: through the class weights, or through alpha = dy/dA, which
    # only carries gradient when the Grad-CAM graph is kept (create_graph=True)
    head_weight = next(p for name, p in student.head.named_parameters() if name.endswith("weight"))
    assert nonzero_grad(head_weight)
    assert all(p.grad is None for p in teacher.parameters())


def test_decoupled_kd_matches_a_hand_computed_value():
    """DKD on one sample of three classes, label 0, T = 2, alpha 1, beta 8, against the paper's
    formulas worked out here in plain Python."""
    import math

    from kd_core.losses.base import ModelOutput, StepOutputs
    from kd_core.losses.terms import DecoupledKD

    student_logits, teacher_logits, label, temperature = [1.0, 2.0, 0.5], [3.0, 1.0, -1.0], 0, 2.0

    def softmax(values):
        exps = [math.exp(v / temperature) for v in values]
        return [e / sum(exps) for e in exps]

    p_s, p_t = softmax(student_logits), softmax(teacher_logits)
    b_s, b_t = [p_s[label], 1 - p_s[label]], [p_t[label], 1 - p_t[label]]
    tckd = sum(t * math.log(t / s) for t, s in zip(b_t, b_s))
    q_s = [p / (1 - p_s[label]) for i, p in enumerate(p_s) if i != label]
    q_t = [p / (1 - p_t[label]) for i, p in enumerate(p_t) if i != label]
    nckd = sum(t * math.log(t / s) for t, s in zip(q_t, q_s))
    expected = temperature**2 * (1.0 * tckd + 8.0 * nckd)

    model = torch.nn.Identity()
    outputs = StepOutputs(ModelOutput(None, torch.tensor([student_logits]), model),
                          ModelOutput(None, torch.tensor([teacher_logits]), model), torch.tensor([label]))
    losses = DecoupledKD(temperature=temperature, alpha=1.0, beta=8.0)(outputs)
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["tckd"].item() == pytest.approx(temperature**2 * tckd, rel=1e-5)
    assert losses["nckd"].item() == pytest.approx(temperature**2 * nckd, rel=1e-5)
    # alpha = beta = 1 - p_t: DKD is Hinton's KD exactly (the paper's eq. 2 reformulation)
    weight = 1 - p_t[label]
    from kd_core.losses.terms import SoftTargetKD
    hinton = SoftTargetKD(temperature=temperature)(outputs)["loss"].item()
    assert DecoupledKD(temperature=temperature, alpha=1.0, beta=weight)(outputs)["loss"].item() == \
        pytest.approx(hinton, rel=1e-5)
    # a student equal to its teacher has nothing to learn
    same = StepOutputs(outputs.teacher, outputs.teacher, outputs.labels)
    assert DecoupledKD(temperature=temperature)(same)["loss"].item() == pytest.approx(0.0, abs=1e-7)
