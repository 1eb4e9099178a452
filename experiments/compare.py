r"""The study: sigmoid + MSE vs softmax + CE, several seeds each, statistics, plots, report.md.

  python experiments/compare.py --workdir=runs/study --epochs=10 --num_seeds=3

Each loss trains its seeds as one vmapped program in WORKDIR/<loss> (resumable like a single
run); WORKDIR gets results.json, loss_curves.png, test_error.png, final_test_error.png and
report.md. --report_only regenerates the plots and report from results.json.
Every flag of experiments/train.py applies (except --loss; --num_seeds defaults to 3 here).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from softsig import launch  # noqa: E402

launch.reexec_with_tuned_cpu_environment()  # before jax is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

import train as train_cli  # noqa: E402  (experiments/train.py: the shared flag definitions)
from softsig import config as config_lib  # noqa: E402
from softsig.losses import LOSS_NAMES  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    def body():
        from softsig import study

        workdir = config_lib.check_workdir(flags.FLAGS.workdir)
        if flags.FLAGS.report_only:
            results = study.load_results(workdir)
            path = study.write_report(results, workdir)
        else:
            config = train_cli.config_from_flags()
            losses = study.check_losses([x for x in flags.FLAGS.losses.split(",") if x])
            config_lib.Config(**{**config.to_dict(), "loss": losses[0]}).validate()
            train_cli.start_jax()
            try:
                rates = [float(x) for x in flags.FLAGS.lr_sweep if x]
            except ValueError:
                raise config_lib.ConfigError(f"--lr_sweep={','.join(flags.FLAGS.lr_sweep)!r} must be numbers.") from None
            vmap_seeds = {"auto": None, "true": True, "false": False}[flags.FLAGS.vmap_seeds]
            results = study.run_study(config, workdir, losses, config.num_seeds, lr_sweep=rates, vmap_seeds=vmap_seeds)
            path = os.path.join(workdir, study.REPORT_FILE)
        print(f"report: {path}")
        for line in study.findings(results):
            print(f"- {line}")

    train_cli.run_main(body)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Study directory (one sub-directory per loss).")
    flags.mark_flag_as_required("workdir")
    train_cli.define_config_flags()
    train_cli.define_distributed_flags()
    flags.DEFINE_string("losses", ",".join(LOSS_NAMES), "Comma-separated losses to compare.")
    flags.DEFINE_list("lr_sweep", [], "Extra learning rates per head (e.g. 3e-4,3e-3): the report adds each "
                      "head at its best rate next to the same-rate comparison.")
    flags.DEFINE_enum("vmap_seeds", "auto", ["auto", "true", "false"],
                      "Train a head's seeds as one vmapped program (true) or one run per seed (false); auto: "
                      "vmapped on GPU/TPU, one run per seed on CPU, where vmapping costs ~35% throughput.")
    flags.DEFINE_bool("report_only", False, "Regenerate plots and report.md from results.json; no training.")
    flags.FLAGS.set_default("num_seeds", 3)
    app.run(main)
