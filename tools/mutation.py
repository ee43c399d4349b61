"""Mutation testing (mutmut 3) of one module at a time: ``make mutation MODULE=objectives``.

``python3 tools/mutation.py MODULE [mutmut arguments]`` runs ``mutmut`` with the
``[tool.mutmut]`` settings of ``pyproject.toml`` except two: only MODULE's file is mutated, and
the test selection is MODULE's fast tests below. mutmut 3 then records once which of those tests
reach each mutated function and runs, for each mutant, only those tests (``-x``), so a whole
module fits in minutes to an hour on 2 cores. Examples::

    python3 tools/mutation.py objectives run --max-children 2
    python3 tools/mutation.py objectives results --all true
    python3 tools/mutation.py objectives show hardneg.objectives.x_safe_logsumexp__mutmut_3

Every module shares the one ``mutants/`` directory mutmut uses: delete it (``rm -rf mutants``)
before switching modules (``make mutation`` does). ``python3 tools/mutation.py list`` prints the
modules. See docs/testing.md for the scores measured and the survivors judged equivalent.
"""

from __future__ import annotations

import dataclasses
import sys

# The fast tests of the loss core: every strategy, objective and contrast builder is reached
# through them (the public API and the float64 oracles); none is marked slow.
LOSS_TESTS = [
    "tests/test_objectives.py",
    "tests/test_contrast.py",
    "tests/test_contrastive_loss.py",
    "tests/test_core.py",
    "tests/test_losses_reference.py",
    "tests/test_gradient_oracles.py",
    "tests/test_losses_errors.py",
    "tests/test_strategies_more.py",
    "tests/test_strategies_mixing.py",
    "tests/test_potential.py",
    "tests/test_plugin_strategy.py",
    "tests/test_hardness.py",
    "tests/test_positive_aware_filter.py",
    "tests/test_ring_strategy.py",
    "tests/test_unremix_strategy.py",
    "tests/test_simans_strategy.py",
    "tests/test_potential_strategy.py",
    "tests/test_fnc_strategy.py",
    "tests/test_mochi_strategy.py",
]
# torch.compile cannot trace mutmut's trampolines (every mutated function is wrapped)
DESELECT = ["tests/test_potential.py::test_eager_and_compiled_agree_in_values_and_gradients"]
TRAIN_TESTS = [
    "tests/test_train.py",
    "tests/test_train_behaviour.py",
    "tests/test_checkpoint.py",
    "tests/test_checkpoint_rng.py",
    "tests/test_frameworks.py",
]
# Narrower selections for modules that every training run reaches: with TRAIN_TESTS each
# surviving mutant of MoCo or the checkpoint writer re-runs every training test (minutes each on
# 2 shared cores). The framework's unit tests and the trainer's behaviour tests (MoCo's momentum
# update and queue inside a run) assert MoCo's formulas; the checkpoint tests assert the writer's
# and reader's behaviour. The scores in docs/testing.md are lower bounds of what TRAIN_TESTS kill.
FRAMEWORK_TESTS = ["tests/test_frameworks.py", "tests/test_train_behaviour.py"]
CHECKPOINT_TESTS = ["tests/test_checkpoint.py", "tests/test_checkpoint_rng.py"]
# trainer.py: every mutant of train() would re-run every training test; the behaviour tests
# (schedule, clipping, data order, ranks, framework state in a run) and the wiring tests (what
# the run hands each helper, the files it writes) are the fast selection, plus the few
# test_train.py runs that alone check what the loop writes and restores: the run's files and
# kNN columns, the bit-exact resume after SIGINT, the non-finite stop / skip, the refusal of a
# used or mismatched run folder (about 15 s in all; not the framework x strategy grid or the CLI)
TRAIN_FILE_TESTS = [
    f"tests/test_train.py::{name}"
    for name in (
        "test_a_run_writes_its_files",
        "test_a_run_dir_is_not_overwritten",
        "test_sigint_saves_mid_epoch_and_the_resumed_run_is_bit_exact",
        "test_shuffle_bn_does_not_block_a_resume",
        "test_resuming_with_another_set_up_explains_the_mismatch",
        "test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint",
        "test_nan_loss_steps_are_skipped_with_nonfinite_skip",
    )
]
TRAINER_TESTS = [
    "tests/test_train_behaviour.py",
    "tests/test_trainer_wiring.py",
    *TRAIN_FILE_TESTS,
]

# The direct oracles of the loss core (float64 loops, one entry at a time): the selection for the
# objective, the contrast sets and the loss module. The broader LOSS_TESTS also reach them but
# take minutes per surviving mutant on 2 shared cores; the scores in docs/testing.md are lower
# bounds of what the whole suite kills.
ORACLES = ["tests/test_core.py", "tests/test_gradient_oracles.py"]

# HCL's graph objective and InfoGraph: the JSD_hard oracle (the authors' code restated) and the
# InfoGraph unit tests of tests/test_graph.py (about 10 s); not the graph training runs, the data
# loaders or the compare command, which reach these modules only through the same calls
GRAPH_LOSS_TESTS = [
    f"tests/test_graph.py::{name}"
    for name in (
        "test_jsd_hard_equals_the_authors_formula",
        "test_jsd_hard_float32_and_the_directions_differ",
        "test_authors_weights_favour_low_scores",
        "test_jsd_hard_needs_two_graphs_and_valid_options",
        "test_jsd_hard_equals_the_authors_formula_for_any_tau_temperature_and_two_graphs",
        "test_jsd_hard_refuses_bad_settings_and_contrast_sets_with_the_exact_message",
        "test_infograph_contrast_pairs_nodes_with_their_graph",
        "test_infograph_jsd_is_infographs_loss",
        "test_infograph_defaults_and_errors",
        "test_infograph_refuses_settings_its_objective_never_reads",
        "test_infograph_applies_the_settings_its_objective_reads",
        "test_infograph_trains_with_every_strategy",
        "test_infograph_with_hcl_is_the_authors_jsd_hard_of_its_heads",
        "test_infograph_heads_and_encoder_defaults",
        "test_infograph_refusals_carry_their_exact_message",
        "test_infograph_draws_from_the_given_generator_and_reads_progress",
    )
]
# the kNN monitor and the linear probe: their own tests (tests/test_eval.py, about 6 s)
EVAL_TESTS = ["tests/test_eval.py"]
# the checkpoint evaluation (session 17): the `hardneg eval` tests (a tiny trained run, evaluated
# with the kNN and the probe). evaluation/features.py has no module: mutmut 3 does not mutate a
# decorated function, and its one function is @torch.no_grad()
EVALUATE_TESTS = ["tests/test_cli_eval.py"]
# the diagnostics' own tests and the reference policies (the unlabelled anchor's NaN measures are
# asserted there): a fast first pass (about 20 s) whose survivors go to `diagnostics`' selection
DIAGNOSTICS_OWN_TESTS = ["tests/test_diagnostics.py", "tests/test_losses_reference.py"]
# the reports: their unit tests (tables, verdicts, markdown, plots, run folders; about 10 s), not
# the compare command's runs (2 min on 2 cores, re-run by every surviving mutant they reach)
REPORT_TESTS = ["tests/test_report.py"]
# the registry: plug-in registration, the loss errors (unknown names and keywords) and the loss
# wrapper's settings (not tests/test_docs.py: mutmut's copy has no README or docs/ to read)
REGISTRY_TESTS = [
    "tests/test_plugin_strategy.py",
    "tests/test_losses_errors.py",
    "tests/test_contrastive_loss.py",
]
# the beta and rho_out schedules: the reference policies of tests/test_losses_reference.py and
# the strategies that call them (HCL's beta_anneal, Ring's anneal)
SCHEDULE_TESTS = ["tests/test_losses_reference.py", "tests/test_ring_strategy.py"]

# offline mining (tests/test_mining.py) and its helpers called directly (the cache fingerprint,
# the candidates' contrast set, the row files: tests/test_mining_units.py)
MINING_TESTS = ["tests/test_mining.py", "tests/test_mining_units.py"]

# name -> (files mutated, tests run)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "objectives": (["src/hardneg/objectives.py"], ["tests/test_objectives.py", *ORACLES]),
    "contrast": (["src/hardneg/contrast.py"], ["tests/test_contrast.py", *ORACLES]),
    "losses": (
        ["src/hardneg/losses/contrastive.py"],
        ["tests/test_contrastive_loss.py", "tests/test_losses_errors.py", *ORACLES],
    ),
    # the argument and tensor checks: their errors are asserted by the loss error tests and
    # directly (tests/test_checks.py), and every loss call passes its embeddings through
    # check_embeddings
    "_checks": (
        ["src/hardneg/_checks.py"],
        ["tests/test_checks.py", "tests/test_losses_errors.py", "tests/test_contrastive_loss.py"],
    ),
    # the step's diagnostics: their definitions (tests/test_diagnostics.py) and every loss
    # test that asks for them
    "diagnostics": (["src/hardneg/diagnostics.py"], ["tests/test_diagnostics.py", *LOSS_TESTS]),
    "strategies": (["src/hardneg/strategies/*.py"], LOSS_TESTS),
    **{
        f"strategies/{name}": ([f"src/hardneg/strategies/{name}.py"], LOSS_TESTS)
        for name in (
            "base",
            "uniform",
            "importance",
            "ring",
            "unremix",
            "potential",
            "positive_aware",
            "simans",
            "hardness",
            "mochi",
            "false_negatives",
        )
    },
    # the speed paths: each is tested equal to its plain twin (tests/test_fastpaths.py) and is
    # reached by the strategies' tests; mutate a subset of functions at a time (run NAMES...);
    # tests/test_fastpaths_mixing.py: the edge cases of the mixing, band and tilt paths,
    # tests/test_fastpaths_draws.py: the random-byte draws against their definition
    "fastpaths": (
        ["src/hardneg/fastpaths.py"],
        [
            *LOSS_TESTS,
            "tests/test_fastpaths.py",
            "tests/test_fastpaths_mixing.py",
            "tests/test_fastpaths_draws.py",
        ],
    ),
    "moco": (["src/hardneg/frameworks/moco.py"], FRAMEWORK_TESTS),
    "memory_bank": (["src/hardneg/frameworks/memory_bank.py"], TRAIN_TESTS),
    "checkpoint": (["src/hardneg/train/checkpoint.py"], CHECKPOINT_TESTS),
    "optim": (["src/hardneg/train/optim.py"], TRAIN_TESTS),
    "trainer": (["src/hardneg/train/trainer.py"], TRAINER_TESTS),
    "graph/jsd_hard": (["src/hardneg/graph/jsd_hard.py"], GRAPH_LOSS_TESTS),
    "graph/infograph": (["src/hardneg/graph/infograph.py"], GRAPH_LOSS_TESTS),
    "evaluation/knn": (["src/hardneg/evaluation/knn.py"], EVAL_TESTS),
    "evaluation/linear": (["src/hardneg/evaluation/linear.py"], EVAL_TESTS),
    "schedules": (["src/hardneg/schedules.py"], SCHEDULE_TESTS),
    "evaluation/evaluate": (["src/hardneg/evaluation/evaluate.py"], EVALUATE_TESTS),
    "diagnostics-own": (["src/hardneg/diagnostics.py"], DIAGNOSTICS_OWN_TESTS),
    "report": (["src/hardneg/report/*.py"], REPORT_TESTS),
    **{
        f"report/{name}": ([f"src/hardneg/report/{name}.py"], REPORT_TESTS)
        for name in ("markdown", "plots", "runs", "table", "verdict")
    },
    "registry": (["src/hardneg/registry.py"], REGISTRY_TESTS),
    # offline mining: its own tests (tests/test_mining.py but the two multi-process runs below,
    # about 25 s; each mutant re-runs only the tests that reach its function)
    "mining": (["src/hardneg/mining.py"], MINING_TESTS),
    # the sentence-transformers losses: their own tests (tiny local models; mutate a subset of
    # functions at a time with the mutant-name filter)
    "integrations": (
        ["src/hardneg/integrations/sentence_transformers.py"],
        ["tests/test_text_integration.py"],
    ),
    # the same with the two-process gloo test (its children import mutmut's copy and inherit
    # the mutant's name): for the survivors of the sharded helpers, named on the command line
    "mining-sharded": (["src/hardneg/mining.py"], MINING_TESTS),
}


# tests left out of one module's selection: the mining runs in two gloo processes and under
# torchrun take 80 s of the selection's 100 s on 2 cores, and every surviving mutant of
# mine_hard_negatives would re-run them; the sharded path they check (world > 1) runs only in
# their child processes, where mutmut records no hit (_gather_rows and _collective_device have
# no test in mutmut's eyes either way). `mining-sharded` runs the gloo test on named mutants.
MODULE_DESELECT = {
    "mining": [
        "tests/test_mining.py::test_two_gloo_processes_mine_the_same_negatives_as_one",
        "tests/test_mining.py::test_torchrun_cli_writes_the_rows_of_one_process_from_rank_0_only",
    ],
    "mining-sharded": [
        "tests/test_mining.py::test_torchrun_cli_writes_the_rows_of_one_process_from_rank_0_only",
    ],
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODULES:
        print(__doc__.strip().splitlines()[0])
        print("modules:", " ".join(MODULES))
        return 0 if argv[:1] == ["list"] else 2
    from mutmut import configuration
    from mutmut.__main__ import cli

    files, tests = MODULES[argv[0]]
    cfg = configuration.config()
    deselected = [*DESELECT, *MODULE_DESELECT.get(argv[0], [])]
    deselect = [arg for test in deselected for arg in ("--deselect", test)]
    configuration._config = dataclasses.replace(
        cfg,
        only_mutate=files,
        pytest_add_cli_args_test_selection=tests,
        pytest_add_cli_args=[*cfg.pytest_add_cli_args, *deselect],
    )
    sys.argv = ["mutmut", *argv[1:]]
    return cli()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
