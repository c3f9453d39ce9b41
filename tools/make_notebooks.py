"""Write the numbered notebooks (no outputs). Edit here, then run: python tools/make_notebooks.py"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = """from hybridlib.runs import NotebookParams

nb = NotebookParams(globals())  # every name set below (or injected by papermill) is a parameter"""

PARAMS_TRAIN = """params_file = None  # a params YAML, e.g. "params/imdb.yaml" (None: $HYBRIDLIB_PARAMS, else hybridlib.Config defaults)
run_dir = None      # None: a new outputs/<dataset>-<timestamp>
# Any other hybridlib.Config field may be set here too, e.g. epochs = 1 or max_train_samples = 2000"""

PARAMS_RUN = """params_file = None  # not needed here: the run's own params.yaml is used
run_dir = None      # a run folder under outputs/ (None: the newest finished run)"""


def nb(cells):
    out = nbf.v4.new_notebook()
    out.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    for i, (kind, src, *tags) in enumerate(cells):
        c = nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
        c.id = f"cell-{i}"  # stable ids: regenerating gives no spurious diffs
        if tags:
            c.metadata["tags"] = tags
        out.cells.append(c)
    return out


NOTEBOOKS = {
    "01_data_exploration.ipynb": [
        ("md", "# 01 · Data exploration\n\nWhat are we classifying? Class balance, example texts, and how many "
               "tokens the texts take against `max_length` (how much truncation costs). Tokenization here is "
               "cached: the training notebook reuses it."),
        ("code", SETUP),
        ("code", PARAMS_TRAIN, "parameters"),
        ("code", "from hybridlib import exploration\nfrom hybridlib.data import prepare_data\n\ncfg = nb.config()\ndata = prepare_data(cfg)\ndata.splits"),
        ("md", "## Class balance\nThe validation split is stratified from train, so its shares match train's."),
        ("code", "exploration.class_balance(data)"),
        ("md", "## Example texts"),
        ("code", "exploration.examples(data, per_class=2)"),
        ("md", "## Token lengths against `max_length`\nLengths are counted before truncation; the red line is the cut."),
        ("code", "exploration.length_summary(data, cfg.max_length)"),
        ("code", "exploration.plot_lengths(data, cfg, run_dir=cfg.run_dir);"),
    ],
    "02_training.ipynb": [
        ("md", "# 02 · Training\n\nShared embedding → BiLSTM ∥ multi-kernel CNN → concat → MLP. AdamW with warm-up "
               "and decay, gradient clipping, early stopping on validation accuracy. With `pretrained_embeddings: ppmi` "
               "(the IMDB and AG News defaults) the embedding starts from word vectors computed from this run's own "
               "training split; with `branch_aux_loss` > 0 each branch also has its own small classifier in the loss, "
               "so neither branch is left undertrained (see docs/accuracy.md). The best epoch is saved as "
               "`model.pt`, every epoch as `last.pt` (for `--resume`), and `training_log.csv` grows by one row per epoch.\n\n"
               "With `num_processes` > 1 (e.g. `hybridlib run ... -p num_processes 2`) `fit` trains with that many "
               "processes on this machine (one per GPU, or CPU processes) via `torch.distributed`; see docs/distributed.md."),
        ("code", SETUP),
        ("code", PARAMS_TRAIN, "parameters"),
        ("code", "from hybridlib.data import prepare_data\nfrom hybridlib.distributed import fit\nfrom hybridlib.model import HybridClassifier\nfrom hybridlib.runs import start_run\n\ncfg = nb.config()\nrun_dir = start_run(cfg)\ndata = prepare_data(cfg)\nprint(f\"run folder: {run_dir}\")\nprint(HybridClassifier(cfg, data.vocab_size, len(data.label_names), data.pad_id))  # the architecture (no weights yet)"),
        ("code", "result = fit(cfg, run_dir, data)  # num_processes > 1: DDP workers on this machine"),
        ("code", "import pandas as pd\n\nprint(f\"best validation accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}; \"\n      f\"{result.train_seconds:.0f} s of training, {result.num_parameters:,} parameters\")\npd.DataFrame(result.history).set_index(\"epoch\").round(4)"),
    ],
    "03_evaluation.ipynb": [
        ("md", "# 03 · Evaluation\n\nThe best checkpoint on the test split: accuracy, macro F1, per-class scores, and "
               "the mistakes the model was most sure of. Writes `metrics.json` and `classification_report.txt`."),
        ("code", SETUP),
        ("code", PARAMS_RUN, "parameters"),
        ("code", "from hybridlib.data import prepare_data\nfrom hybridlib.evaluation import baseline_table, confident_mistakes, evaluate_run, metrics_table\n\ncfg, run_dir = nb.run_config()\ndata = prepare_data(cfg)\nout = evaluate_run(cfg, run_dir, data)\nmetrics_table(out[\"metrics\"])"),
        ("code", "print(out[\"report\"])"),
        ("md", "## Against the classic baseline\nTF-IDF (1-2-grams) + logistic regression, fitted on the same train split, "
               "C chosen on the same validation split (`baseline: false` skips it). Is the deep model worth it?\n\n"
               "The last row averages the two models' class probabilities, with the weight chosen on the validation "
               "split (lowest log-loss); the test split only scores it. When the mix beats both, they make different mistakes."),
        ("code", "baseline_table(out[\"metrics\"])"),
        ("md", "## Most confident mistakes"),
        ("code", "confident_mistakes(data.splits[\"test\"][\"text\"], out[\"test\"], data.label_names, k=10)"),
    ],
    "04_visualization.ipynb": [
        ("md", "# 04 · Visualization\n\nLearning curves (did it over- or under-fit? where was the best epoch?) and the "
               "test confusion matrix. Writes `loss_acc_curves.png` and `confusion_matrix.png`."),
        ("code", SETUP),
        ("code", PARAMS_RUN, "parameters"),
        ("code", "from IPython.display import Image, display\n\nfrom hybridlib.plots import save_run_plots\n\ncfg, run_dir = nb.run_config()\npaths, metrics = save_run_plots(run_dir)\nfor p in paths:\n    display(Image(filename=str(p)))"),
    ],
    "05_prediction.ipynb": [
        ("md", "# 05 · Prediction\n\nClassify your own texts with a trained run (`hybridlib.Predictor`; the same "
               "from the shell: `hybridlib predict --checkpoint outputs/RUN/model.pt --text \"...\"`)."),
        ("code", SETUP),
        ("code", PARAMS_RUN, "parameters"),
        ("code", "from hybridlib.prediction import Predictor\nfrom hybridlib.widgets import examples_for, make_predict_widget\n\ncfg, run_dir = nb.run_config()\npredictor = Predictor.from_run(run_dir)\npredictor.table(examples_for(cfg.dataset))"),
        ("md", "The same texts through the run's model + TF-IDF ensemble, the mix its evaluation measured "
               "(`metrics.json` → `ensembles`; `Predictor.from_run(run, ensemble=True)`, `hybridlib predict --ensemble`):"),
        ("code", "if (run_dir / \"tfidf_logreg.npz\").is_file():  # absent when evaluated with baseline: false\n"
                 "    display(Predictor.from_run(run_dir, ensemble=True).table(examples_for(cfg.dataset)))"),
        ("md", "## Try it\nPick a run, type or paste a text (or click an example) and press **Predict**: the label, "
               "the probability of every class, and the words that pushed the decision (green: towards the "
               "predicted class, red: away from it; gradient × input)."),
        ("code", "make_predict_widget(run_dir=run_dir)"),
    ],
    "06_compare_runs.ipynb": [
        ("md", "# 06 · Compare runs\n\nRuns side by side: the ablation `branches: [cnn]` / `[lstm]` / `[cnn, lstm]`, "
               "seeds, or any other change. Runs that share params (all but the seed) are one row, mean ± std over "
               "their seeds. Same as `hybridlib compare outputs/RUN ...`."),
        ("code", "runs = []     # run folders to compare (empty: every evaluated run under outputs/)\n"
                 "out_dir = None  # where comparison.md/.csv and val_curves.png go (None: outputs/comparison)", "parameters"),
        ("code", "from hybridlib.compare import compare_runs, plot_val_curves, write_comparison\nfrom hybridlib.runs import list_runs, outputs_root\n\n"
                 "run_dirs = runs or [r[\"run_dir\"] for r in list_runs() if (r[\"run_dir\"] / \"metrics.json\").is_file()]\n"
                 "table, paths = write_comparison(run_dirs, out_dir or outputs_root() / \"comparison\")\ntable"),
        ("code", "_, loaded = compare_runs(run_dirs)\nplot_val_curves(loaded);"),
    ],
}


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbf.write(nb(cells), HERE / name)
        print("wrote", HERE / name)
