"""Every recipe under ``recipes/`` loads and validates, without loading a model or downloading data.

Also pins what the recipes promise: the quickstart variants are ``grpo.yaml`` with only the
``algorithm`` section changed (so ``rltk compare`` runs are apples-to-apples, and a variant file
trains exactly what the named ``--variants`` preset trains), the paper recipes carry the
hyperparameters stated in ``docs/algorithms/{nsr,ace,resrl}.md``, and each real-model recipe is its
directory's ``base.yaml`` (or ``*_base.yaml``) plus only what differs. A base is not a recipe: the
tests that iterate over recipes skip it.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from rltk.algos.pipeline import AlgorithmPipeline
from rltk.schema import Recipe, flatten_keys, load_recipe_data
from rltk.validate import build_recipe, load_recipe
from rltk.workflows import variant_data

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def is_base(path: Path) -> bool:
    """A base of other recipes (``base.yaml``, ``redi_base.yaml``), not a recipe of its own."""
    return path.stem == "base" or path.stem.endswith("_base")


BASES = sorted(p for p in RECIPES.rglob("*.yaml") if is_base(p))
ALL_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if not is_base(p))
REAL_MODEL_RECIPES = [p for p in ALL_RECIPES if p.parent.name != "quickstart"]
QUICKSTART_VARIANTS = ["psr", "nsr", "w_reinforce", "ace", "resrl"]
PAPER_RECIPES = [
    "qwen2.5-math-7b/psr.yaml",
    "qwen2.5-math-7b/nsr.yaml",
    "qwen2.5-math-7b/w_reinforce.yaml",
    "qwen2.5-math-7b/ace_grpo.yaml",
    "qwen2.5-math-7b/ace_dapo.yaml",
    "qwen2.5-math-7b/resrl.yaml",
    "qwen3-4b/resrl.yaml",
]


def _id(path: Path) -> str:
    return str(path.relative_to(RECIPES))


def _load(relative: str) -> Recipe:
    return load_recipe(RECIPES / relative)


def _entry(spec) -> tuple[str, dict]:
    """(name, params) of a stage entry written as a name or a mapping."""
    if isinstance(spec, str):
        return spec, {}
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}


def _advantage(recipe: Recipe) -> list[tuple[str, dict]]:
    return [_entry(spec) for spec in recipe.algorithm.advantage]


def _terms(recipe: Recipe) -> dict[str, dict]:
    return dict(_entry(spec) for spec in recipe.algorithm.terms)


def _needs(recipe: Recipe) -> set[str]:
    a = recipe.algorithm
    return AlgorithmPipeline(a.advantage, a.loss, a.aggregation, a.terms).needs()


# ------------------------------------------------------------------------------- every recipe


def test_the_recipe_tree_holds_the_expected_files():
    names = {_id(p) for p in ALL_RECIPES}
    expected = {"quickstart/grpo.yaml", *(f"quickstart/{v}.yaml" for v in QUICKSTART_VARIANTS), *PAPER_RECIPES}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=_id)
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path)  # unknown keys, wrong types, bad stage names/params all raise here
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{_id(path)}: start with a one-line comment saying what the recipe is"


# ------------------------------------------------------------------------------- bases


@pytest.mark.parametrize("path", REAL_MODEL_RECIPES, ids=_id)
def test_real_model_recipe_holds_only_what_differs_from_its_base(path):
    """Each real-model method file names a base and sets no key to the value its base already gives
    it, so the file reads as the method's choices; the base's own values are documented there."""
    own = yaml.safe_load(path.read_text())
    assert isinstance(own.get("base"), str), f"{_id(path)}: start from the directory's base with 'base: base.yaml'"
    base = flatten_keys(load_recipe_data(path.parent / own.pop("base")))
    repeated = {k: v for k, v in flatten_keys(own).items() if k in base and base[k] == v}
    assert not repeated, f"{_id(path)} repeats what its base sets: {repeated}"


def test_every_base_is_used_and_is_no_recipe_of_its_own():
    named = {(p.parent / yaml.safe_load(p.read_text())["base"]).resolve() for p in REAL_MODEL_RECIPES}
    assert BASES and set(BASES) <= named, sorted(_id(b) for b in set(BASES) - named)
    for base in BASES:
        text = base.read_text()
        header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        assert "not a recipe by itself" in header, f"{_id(base)}: say in its header comment that it is a base"
        assert "\n# launch:" not in text and "output_dir" not in yaml.safe_load(text).get("trainer", {}), _id(base)


# ------------------------------------------------------------------------------- quickstart


@pytest.mark.parametrize("variant", QUICKSTART_VARIANTS)
def test_quickstart_variant_differs_from_grpo_only_in_algorithm(variant):
    base = load_recipe_data(RECIPES / "quickstart" / "grpo.yaml")
    data = load_recipe_data(RECIPES / "quickstart" / f"{variant}.yaml")
    assert set(data) == set(base)
    for section in base:
        if section != "algorithm":
            assert data[section] == base[section], f"quickstart/{variant}.yaml: '{section}' differs from grpo.yaml"
    # ... and the algorithm is exactly the named `rltk compare --variants` preset applied to grpo.yaml
    assert data["algorithm"] == variant_data(base, variant)["algorithm"]
    built = _load(f"quickstart/{variant}.yaml").to_dict()
    built_base = _load("quickstart/grpo.yaml").to_dict()
    built.pop("algorithm"), built_base.pop("algorithm")
    assert built == built_base


def test_cold_start_is_grpo_with_a_short_warm_start_and_a_learning_curve():
    """quickstart/cold_start.yaml (the measured cold-start experiment, docs/algorithms/garl_paft.md)
    is grpo.yaml with only the warm-start length, the RL length, the eval interval and the output
    directory changed, so the experiment's numbers carry over to the quickstart's settings."""
    base = _load("quickstart/grpo.yaml").to_dict()
    cold = _load("quickstart/cold_start.yaml").to_dict()
    assert (cold["sft"]["steps"], cold["trainer"]["steps"], cold["trainer"]["eval_every"]) == (250, 200, 40)
    assert cold["trainer"]["output_dir"] == "runs/cold_start"
    for section, key in (("sft", "steps"), ("trainer", "steps"), ("trainer", "eval_every"), ("trainer", "output_dir")):
        cold[section].pop(key), base[section].pop(key)
    assert cold == base
    data = load_recipe_data(RECIPES / "quickstart" / "cold_start.yaml")
    for variant in ("grpo", "garl_binary", "garl", "paft"):  # the compared methods validate on it
        assert isinstance(build_recipe(variant_data(data, variant)), Recipe)


def test_level3_is_grpo_on_the_harder_task():
    """quickstart/level3.yaml (the harder comparison task, docs/algorithms/README.md) is grpo.yaml
    with only the task level, the completion length, the warm-start and RL lengths, the evaluation
    protocol and the output directory changed; every method compared on it validates."""
    base = _load("quickstart/grpo.yaml").to_dict()
    hard = _load("quickstart/level3.yaml").to_dict()
    assert (hard["data"]["levels"], hard["rollout"]["max_new_tokens"], hard["sft"]["steps"]) == ([3], 32, 900)
    assert (hard["eval"]["n"], hard["eval"]["temperature"], hard["eval"]["top_p"]) == (64, 0.6, 0.95)
    changed = (("data", "levels"), ("rollout", "max_new_tokens"), ("sft", "steps"), ("trainer", "steps"),
               ("trainer", "eval_every"), ("trainer", "output_dir"), ("eval", "n"), ("eval", "temperature"),
               ("eval", "top_p"))
    for section, key in changed:
        hard[section].pop(key), base[section].pop(key)
    assert hard == base
    data = load_recipe_data(RECIPES / "quickstart" / "level3.yaml")
    for variant in ("grpo", "psr", "nsr", "w_reinforce", "ace", "resrl", "weighted_grpo", "garl", "paft"):
        assert isinstance(build_recipe(variant_data(data, variant)), Recipe)


def test_level3_distillation_recipes_share_the_harder_task():
    """The level-3 distillation comparison (SFT only vs REDI vs PACED from one teacher,
    docs/algorithms/README.md): its three recipes have level3.yaml's task and evaluation protocol;
    the teacher is redi_teacher.yaml's 4-layer model trained longer, REDI keeps redi.yaml's stage 2
    and PACED paced.yaml's weighting and schedule, distillation only, from REDI's stage-1 student."""
    hard = _load("quickstart/level3.yaml")
    teacher, redi, paced = (_load(f"quickstart/level3_{name}.yaml") for name in ("teacher", "redi", "paced"))
    for r in (teacher, redi, paced):
        assert r.to_dict()["data"] == hard.to_dict()["data"] and r.to_dict()["eval"] == hard.to_dict()["eval"]
        assert r.rollout.max_new_tokens == hard.rollout.max_new_tokens
    assert teacher.model.tiny.num_layers == 4 and redi.model.name_or_path == "tiny"
    assert teacher.sft.steps > redi.sft.steps == hard.sft.steps
    assert redi.to_dict()["redi"] == {**_load("quickstart/redi.yaml").to_dict()["redi"],
                                      "data": "runs/evidence/group3/pairs.jsonl",
                                      "sft_data": "runs/evidence/group3/sft.jsonl"}
    teacher_dir = f"{teacher.trainer.output_dir}/{teacher.sft.output_subdir}"
    assert paced.teacher.name_or_path == teacher_dir and not paced.teacher.privileged
    assert paced.model.name_or_path == f"{redi.trainer.output_dir}/{redi.sft.output_subdir}"
    assert paced.algorithm.pg_coef == 0 and not paced.sft.enabled
    level1 = _load("quickstart/paced.yaml").algorithm.paced
    assert (paced.algorithm.paced.alpha, paced.algorithm.paced.beta, paced.algorithm.paced.schedule) == \
        (level1.alpha, level1.beta, level1.schedule)
    assert paced.algorithm.paced.switch_step == paced.trainer.steps // 2
    assert (paced.trainer.steps, paced.trainer.lr, paced.trainer.prompts_per_step) == \
        (hard.trainer.steps, hard.trainer.lr, hard.trainer.prompts_per_step)


def test_quickstart_variants_declare_their_needs():
    assert "ref_logps" in _needs(_load("quickstart/ace.yaml"))  # ACE runs a reference model
    assert "hidden(-2)" in _needs(_load("quickstart/resrl.yaml"))
    assert _needs(_load("quickstart/nsr.yaml")) == set()


# ------------------------------------------------------------------------------- paper recipes


@pytest.mark.parametrize("relative", PAPER_RECIPES)
def test_paper_recipe_common_settings(relative):
    r = _load(relative)
    assert r.model.dtype == "bfloat16" and r.model.gradient_checkpointing
    d = r.data
    assert d.eval_source == "HuggingFaceH4/MATH-500" and d.test_split == "test"
    assert d.source == "DigitalLearningGmbH/MATH-lighteval" and d.train_split == "train"
    # MATH-lighteval and MATH-500 share these columns; `solution` is a worked solution -> extract the box
    assert (d.prompt_field, d.answer_field, d.extract_boxed_answer) == ("problem", "solution", True)
    assert d.template == "boxed" and d.chat_template
    if relative.startswith("qwen3-4b/"):  # the boxed instruction in a non-thinking Qwen3 chat turn
        assert d.chat_template_kwargs == {"enable_thinking": False}
    assert 3072 <= r.rollout.max_new_tokens <= 4096
    assert r.rollout.temperature == 1.0
    assert r.trainer.lr == 1e-6
    assert r.eval.ks == [2**i for i in range(len(r.eval.ks))] and r.eval.ks[-1] == r.eval.n
    assert r.eval.temperature == 0.6
    assert _terms(r)["kl"]["coef"] == 0.0
    assert r.algorithm.aggregation == "token_mean"
    assert r.trainer.steps % (r.trainer.ppo_epochs * r.trainer.mini_batches) == 0
    if relative.startswith("qwen2.5-math-7b/"):  # a 4096-token context: prompt + completion must fit
        assert d.max_prompt_length + r.rollout.max_new_tokens <= 4096
        assert d.max_prompt_length + (r.eval.max_new_tokens or r.rollout.max_new_tokens) <= 4096


@pytest.mark.parametrize("method, estimator, params", [
    ("psr", "psr", {"drop": True}),
    ("nsr", "nsr", {"drop": True}),
    ("w_reinforce", "w_reinforce", {"lam": 0.1}),
])
def test_nsr_paper_recipes(method, estimator, params):
    """Zhu et al. 2025: ppo_clip 0.2, token_mean, no KL, lr 1e-6, G = 8, T = 1.0, MATH, pass@k to 256."""
    r = _load(f"qwen2.5-math-7b/{method}.yaml")
    assert _advantage(r) == [(estimator, params)]
    assert r.algorithm.loss == {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.2}
    assert r.rollout.group_size == 8 and r.rollout.max_new_tokens == 3072
    assert (r.trainer.prompts_per_step, r.trainer.mini_batches) == (1024, 4)
    assert r.data.system_prompt == "You are a helpful assistant."
    assert r.eval.n == 256 and r.eval.top_p == 0.95
    assert _terms(r)["entropy"]["coef"] == 0.001  # verl's default in the authors' runs
    assert _needs(r) == {"entropy"}


@pytest.mark.parametrize("method, filtered, epsilon_high", [("ace_grpo", False, 0.2), ("ace_dapo", True, 0.28)])
def test_ace_paper_recipes(method, filtered, epsilon_high):
    r = _load(f"qwen2.5-math-7b/{method}.yaml")
    stages = _advantage(r)
    names = [name for name, _ in stages]
    assert names == (["grpo", "zero_variance_filter", "ace"] if filtered else ["grpo", "ace"])
    ace = dict(stages)["ace"]
    assert ace == {"alpha": 1.0, "fn": "softplus", "form": "multiplicative", "c_reduction": "sum",
                   "max_multiplier": None}
    assert r.algorithm.loss == {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": epsilon_high}
    assert r.rollout.group_size == 8
    assert r.eval.n == 32 and r.eval.ks[-1] == 32  # the paper reports up to pass@32
    # ACE needs the reference (and behaviour) log-probs even though the KL coefficient is 0
    assert {"ref_logps", "old_logps"} <= _needs(r)


@pytest.mark.parametrize("relative, response", [("qwen2.5-math-7b/resrl.yaml", 3072), ("qwen3-4b/resrl.yaml", 4096)])
def test_resrl_paper_recipes(relative, response):
    from rltk.algos.resrl import resrl

    r = _load(relative)
    stages = _advantage(r)
    assert [name for name, _ in stages] == ["grpo", "resrl"]
    knobs = dict(stages)["resrl"]
    expected = {"layer": -2, "rank": 64, "max_pos_tokens": 4096, "q_low": 0.2, "q_high": 0.8,
                "min_weight": 0.1, "pos_weight": 0.1}
    assert knobs == expected
    defaults = {k: p.default for k, p in inspect.signature(resrl).parameters.items() if k in expected}
    assert defaults == expected  # the recipe spells out ResRL's own defaults
    assert r.algorithm.loss == {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.2}
    assert _terms(r)["entropy"]["coef"] == 0.0
    assert r.rollout.group_size == 4 and r.rollout.max_new_tokens == response
    assert (r.trainer.prompts_per_step, r.trainer.mini_batches) == (512, 16)
    assert r.trainer.weight_decay == 0.1 and r.trainer.lr_scheduler == "constant_with_warmup"
    assert int(r.trainer.warmup_ratio * r.trainer.steps) == 160  # 10 of 34 rollout batches
    assert r.eval.n == 128 and r.eval.top_p == 1.0  # avg@16 and pass@128
    assert "hidden(-2)" in _needs(r)
    assert "ref_logps" not in _needs(r)  # KL 0: no reference model


# ------------------------------------------------------------------------------- pairing, GARL and PAFT (issue 5)

TSALLIS_QUICKSTART = ["weighted_grpo", "garl", "paft"]
TSALLIS_PAPER_RECIPES = [
    "qwen2.5-math-7b/weighted_grpo.yaml",
    "qwen2.5-1.5b-instruct/garl.yaml",
    "qwen2.5-1.5b-instruct/paft.yaml",
]


def _sampler(recipe: Recipe):
    """The recipe's sampler built as the trainer builds it (no model, no probing)."""
    from rltk.algos.pipeline import StageCall

    call = StageCall.from_spec("sampler", recipe.algorithm.sampler)
    return call.name, call.params, call.stage.fn(100, recipe.trainer.seed, **call.params)


def test_the_recipe_tree_holds_the_pairing_and_tsallis_recipes():
    names = {_id(p) for p in ALL_RECIPES}
    expected = {*(f"quickstart/{v}.yaml" for v in TSALLIS_QUICKSTART), *TSALLIS_PAPER_RECIPES}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("variant", TSALLIS_QUICKSTART)
def test_tsallis_quickstart_variant_differs_from_grpo_only_in_algorithm(variant):
    """As for the other quickstart variants, with one allowed difference: quickstart/weighted_grpo.yaml
    may give the pairing sampler knobs on top of the `rltk compare` preset's (probe_size 256 keeps
    the CPU probe short); everything else in `algorithm` is the preset."""
    base = load_recipe_data(RECIPES / "quickstart" / "grpo.yaml")
    data = load_recipe_data(RECIPES / "quickstart" / f"{variant}.yaml")
    assert set(data) == set(base)
    for section in base:
        if section != "algorithm":
            assert data[section] == base[section], f"quickstart/{variant}.yaml: '{section}' differs from grpo.yaml"
    algorithm = dict(data["algorithm"])
    preset = dict(variant_data(base, variant)["algorithm"])
    if variant == "weighted_grpo":
        name, params = _entry(algorithm.pop("sampler"))
        preset_name, preset_params = _entry(preset.pop("sampler"))
        assert name == preset_name == "pairing"
        assert preset_params.items() <= params.items()
    assert algorithm == preset


def test_quickstart_weighted_grpo():
    from rltk.algos.weighted import weighted_grpo

    r = _load("quickstart/weighted_grpo.yaml")
    assert _advantage(r) == [("weighted_grpo", {"lam": 1.0})]
    lam_default = inspect.signature(weighted_grpo).parameters["lam"].default
    scope_default = inspect.signature(weighted_grpo).parameters["scope"].default
    assert (lam_default, scope_default) == (1.0, "pair")  # the recipe keeps the pair reading, lambda = 1
    name, params, sampler = _sampler(r)
    assert name == "pairing" and params == {"probe_size": 256}
    assert sampler.provides_roles and sampler.c is None and sampler.refresh_every == 0  # c = G/4, probe once
    assert sampler.patterns == {"hard": ".*", "easy": ".*"}  # both pools: the whole training set
    assert r.trainer.prompts_per_step % 2 == 0 and r.trainer.mini_batches == 1  # whole (q+, q-) pairs
    assert _needs(r) == {"roles"}


@pytest.mark.parametrize("variant", ["garl", "paft"])
def test_quickstart_garl_and_paft(variant):
    r = _load(f"quickstart/{variant}.yaml")
    tsallis = {"mode": "likelihood", "q": 0.75}
    if variant == "garl":
        assert _advantage(r) == [("garl", tsallis)]
    else:
        assert _entry(r.algorithm.loss) == ("paft", tsallis)
    assert r.algorithm.aggregation == "seq_mean_token_sum"
    assert _needs(r) == {"answer_logps"}  # the extra no-grad forward over prompt + rationale + gold answer
    assert r.data.answer_template == "\\boxed{{{answer}}}"  # the built-in solutions end in \boxed{ANSWER}
    assert r.trainer.micro_batch_size % r.rollout.group_size == 0  # whole groups per micro-batch


def test_paper_weighted_grpo_recipe():
    """Sheng et al. 2026 on Qwen2.5-Math-7B: one (q+, q-) pair per update from the 1,209-prompt pool,
    c = G/4, the bidirectional pair reading with lambda = 1, pass@k up to 64."""
    r = _load("qwen2.5-math-7b/weighted_grpo.yaml")
    assert r.model.name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert r.model.dtype == "bfloat16" and r.model.gradient_checkpointing
    d = r.data
    assert d.source == "agentica-org/DeepScaleR-Preview-Dataset" and d.num_train == 1209
    assert d.eval_source == "yentinglin/aime_2025" and not d.extract_boxed_answer
    assert _advantage(r) == [("weighted_grpo", {"scope": "pair", "lam": 1.0})]
    name, params, sampler = _sampler(r)
    assert name == "pairing" and sampler.provides_roles
    assert params["c"] == r.rollout.group_size // 4 == 2
    assert params["refresh_every"] == 0 and params["probe_size"] >= d.num_train  # probe the whole pool once
    assert r.trainer.prompts_per_step == 2 and r.trainer.mini_batches == 1  # a single pair per update
    assert _needs(r) == {"roles"}
    assert d.max_prompt_length + r.rollout.max_new_tokens <= 4096  # Qwen2.5-Math-7B's context
    assert d.max_prompt_length + (r.eval.max_new_tokens or r.rollout.max_new_tokens) <= 4096
    assert r.eval.n == 64 and r.eval.ks == [1, 2, 4, 8, 16, 32, 64]  # pass@8 (AIME 2025), pass@64 (AMC23)
    assert _terms(r)["kl"]["coef"] == 0.0


@pytest.mark.parametrize("method", ["garl", "paft"])
def test_paper_garl_paft_recipes(method):
    """Lin & Ie 2026 with the paper's M = 32 and q = 0.75 in likelihood mode on a small instruct model."""
    from rltk.algos.tsallis import garl

    r = _load(f"qwen2.5-1.5b-instruct/{method}.yaml")
    assert r.model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and r.data.chat_template
    assert r.rollout.group_size == 32  # M
    tsallis = {"mode": "likelihood", "q": 0.75}
    assert inspect.signature(garl).parameters["q"].default == 0.75
    if method == "garl":
        assert _advantage(r) == [("garl", tsallis)]
        assert r.algorithm.loss == "reinforce"
    else:
        assert _advantage(r) == [("grpo", {})]  # ignored by paft
        assert _entry(r.algorithm.loss) == ("paft", tsallis)
    assert r.algorithm.aggregation == "seq_mean_token_sum"
    assert _needs(r) == {"answer_logps"}
    assert _terms(r)["kl"]["coef"] == 0.0  # no reference model
    d = r.data
    # the gold answer is written after each rationale the way the prompt asks the model to answer
    from rltk.data.templates import TEMPLATES

    assert d.extract_boxed_answer and "\\boxed{}" in TEMPLATES[d.template].format(question="Q?")
    assert d.answer_template.format(answer="42") == "\\boxed{42}"
    assert (r.trainer.ppo_epochs, r.trainer.mini_batches) == (1, 1)  # on-policy, one update per batch
    assert r.trainer.micro_batch_size % r.rollout.group_size == 0  # PAFT draws within whole groups
    assert r.eval.n == 16 and r.eval.maj  # the paper reports maj@16
    assert r.trainer.output_dir.endswith(method)


# ------------------------------------------------------------------------------- PACED


def test_quickstart_paced():
    from rltk.data.synthetic import CHARSET

    r = _load("quickstart/paced.yaml")
    p = r.algorithm.paced
    assert (p.alpha, p.beta, p.schedule) == (1.0, 1.0, "forward_then_reverse")  # the paper's defaults
    assert p.switch_step == r.trainer.steps // 2 and r.algorithm.pg_coef == 1.0
    assert r.teacher.privileged and r.teacher.name_or_path is None  # offline: the student reads the solution
    assert set(r.teacher.privileged_template) <= set(CHARSET)  # the tiny tokenizer can read it
    base = load_recipe_data(RECIPES / "quickstart/grpo.yaml")
    data = load_recipe_data(RECIPES / "quickstart/paced.yaml")
    for section in base:
        if section not in ("algorithm", "trainer"):
            assert data[section] == base[section], f"quickstart/paced.yaml: '{section}' differs from grpo.yaml"
    assert {k: v for k, v in data["trainer"].items() if k != "output_dir"} == \
        {k: v for k, v in base["trainer"].items() if k != "output_dir"}


def test_paper_paced_recipe():
    """Qwen2.5-Math-7B-Instruct -> Qwen2.5-Math-1.5B, distillation only, validated without downloads."""
    r = _load("qwen2.5-math-1.5b/paced.yaml")
    assert r.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    assert r.teacher.name_or_path == "Qwen/Qwen2.5-Math-7B-Instruct" and not r.teacher.privileged
    assert r.model.dtype == r.teacher.dtype == "bfloat16"
    assert r.algorithm.pg_coef == 0.0
    p = r.algorithm.paced
    assert (p.alpha, p.beta, p.schedule, p.coef) == (1.0, 1.0, "forward_then_reverse", 1.0)
    assert 0 < p.switch_step < r.trainer.steps
    assert r.rollout.group_size >= 4  # the pass rate needs several rollouts per problem
    assert r.data.max_prompt_length + r.rollout.max_new_tokens <= 4096  # Qwen2.5-Math's context
    assert r.trainer.micro_batch_size <= 8


def test_quickstart_paced_trains_end_to_end(tmp_path):
    """recipes/quickstart/paced.yaml, shrunk, trains 3 steps with metrics logged and no NaN."""
    import json

    from rltk.workflows import train

    recipe = load_recipe(RECIPES / "quickstart/paced.yaml", [
        "trainer.steps=3", "trainer.prompts_per_step=4", "trainer.micro_batch_size=8", "rollout.group_size=4",
        "rollout.max_new_tokens=8", "sft.steps=3", "sft.batch_size=8", "sft.num_examples=32", "data.num_train=64",
        "data.num_test=4", "eval.n=2", "eval.maj=false", "algorithm.paced.switch_step=2", "logging.progress=false",
        f"trainer.output_dir={tmp_path}", "verifier.num_workers=1"])
    result = train(recipe, evaluate_before=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert all(not isinstance(v, str) for v in row.values()), row  # no NaN/inf strings
        assert {"paced/share_p0", "paced/share_p1", "paced/weight_q50", "paced/skipped_steps"} <= set(row)
    assert 0.0 <= result["after"]["summary"]["pass@k"][1] <= 1.0
