"""``model_card.md``: the model card's facts (evaluation/card.py) as Markdown, one section per part
of Mitchell et al.'s card. It renders the dict ``model_card.json`` holds and reads nothing else, so
the two files always state the same numbers.
"""
from __future__ import annotations

from typing import Any

from pipelines.formatting import estimate, number, percent, signed

SECTION_TITLES = {
    "model": "Model details", "intended_use": "Intended use", "training_data": "Training data",
    "evaluation_data": "Evaluation data", "metrics": "Metrics", "subgroups": "Subgroups",
    "baselines": "Comparison with baselines", "calibration": "Calibration", "robustness": "Robustness",
    "pointing": "Pointing game (Grad-CAM)",
}
SPLITS = ("train", "val", "test")


def _name(finding: str) -> str:
    return finding.replace("_", " ")


def _fig(m: dict | None) -> str:
    """``0.71 [0.65-0.77]``, or why it is undefined."""
    if not m or m.get("auroc") is None:
        return (m or {}).get("note") or "undefined"
    return estimate(m["auroc"], m.get("ci_low"), m.get("ci_high"))


def _diff(d: dict) -> str:
    return f"{signed(d.get('diff'))} [{signed(d.get('diff_ci_low'))}, {signed(d.get('diff_ci_high'))}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def missing_line(part: dict) -> str:
    """A missing section's sentence, e.g. ``Not evaluated: run `cxr evaluate --run DIR`.``"""
    text = part["missing"]
    return f"_{text[0].upper()}{text[1:]}._"


def _model(s: dict) -> list[str]:
    norm = s.get("normalization") or {}
    recipe = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["recipe"].items()) or "not recorded"
    lines = [
        f"- **Checkpoint**: `{s['checkpoint']}`, made by {s['made_by']}" + (f", written {s['trained']}" if s.get("trained") else ""),
        f"- **Checkpoint hash** (SHA-256 of `model.pt`): `{s['sha256']}`" if s.get("sha256") else "- **Checkpoint hash**: `model.pt` is missing",
        f"- **Backbone**: {s.get('backbone')}; **starting weights**: {s.get('starting_weights') or 'not recorded'}",
        f"- **Input**: {s.get('image_size')}x{s.get('image_size')} grayscale"
        + (f", normalized as {norm.get('formula')} with mean {number(norm.get('mean'), 4)} and std {number(norm.get('std'), 4)} (train split)" if norm else ""),
        f"- **Recipe**: {recipe}",
        f"- **Selected epoch**: {s.get('epoch')}" + (f" (validation mean AUROC {number(s['val_mean_auroc'])})" if s.get("val_mean_auroc") is not None else ""),
        f"- **Outputs**: one probability for each of {len(s['findings'])} findings: {', '.join(map(_name, s['findings']))}",
        "",
    ]
    return lines


def _intended(s: dict) -> list[str]:
    return [f"- **Primary use**: {s['primary']}.", f"- **Users**: {s['users']}.", "- **Out of scope**:",
            *[f"  - {x}." for x in s["out_of_scope"]], ""]


def _training(s: dict) -> list[str]:
    lines = [f"- **Collection**: {s['collection']}", f"- **Labels**: {s['label_source']}."]
    if s.get("quarantined") is not None:
        lines.append(f"- **Quarantined records** (rejected at ingest, validation or decoding): {s['quarantined']:,}")
    if s.get("patients_in_two_splits") is not None:
        lines.append(f"- **Leakage audit**: {s['patients_in_two_splits']} patient(s) in more than one split (split seed {s.get('split_seed')})")
    lines += ["", "Patients, not images, are assigned to one split each.", ""]
    lines += _table(["split", "images", "patients"], [[k, f"{v['images']:,}", f"{v['patients']:,}"] for k, v in s["splits"].items()])
    cohorts = s.get("cohorts")
    if cohorts:
        names = sorted({c for by in cohorts.values() for c in by})
        lines += ["Images per cohort:", ""] + _table(["cohort", *SPLITS], [[c, *[cohorts.get(x, {}).get(c, 0) for x in SPLITS]] for c in names])
    people = s.get("train_population") or {}
    if people:
        parts = []
        if "age" in people:
            parts.append(f"age {people['age']['min']}-{people['age']['max']} years (median {number(people['age']['median'], 0)})")
        for column in ("sex", "view"):
            if column in people:
                parts.append(f"{column} " + ", ".join(f"{k} {v}" for k, v in people[column].items()))
        lines += [f"Training split: {'; '.join(parts)}.", ""]
    shown = {f: by for f, by in (s.get("positives") or {}).items() if sum(by.values())}
    if shown:
        lines += ["Positive images per finding:", ""] + _table(["finding", *SPLITS], [[_name(f), *[by.get(x, 0) for x in SPLITS]] for f, by in shown.items()])
    return lines


def _evaluation(s: dict) -> list[str]:
    lines = []
    test = s["internal_test"]
    if test.get("status") == "missing":
        lines.append(f"- **Internal test split**: {missing_line(test)}")
    else:
        lines.append(f"- **Internal test split**: {test['n_images']:,} images of {test['n_patients']:,} patients the model never saw; "
                     f"thresholds chosen on the {test['thresholds_chosen_on']}")
    for name, e in s.get("external", {}).items():
        lines.append(f"- **External set {name}**: {e['n_images']:,} images of {e['n_patients']:,} patients"
                     + (f" ({e['source']}, {e['label_file']})" if e.get("source") else "") + ", from a collection the model never saw")
    if s.get("cv"):
        cv = s["cv"]
        lines.append(f"- **Cross-validation**: every one of {cv['n_images']:,} images of {cv['n_patients']:,} patients scored once, "
                     f"by the model of the fold ({cv['folds']} folds by patient) that held it out")
    return [*lines, ""]


def _metrics(s: dict) -> list[str]:
    lines = ["### Internal test split", ""]
    internal = s["internal"]
    if internal.get("status") == "missing":
        lines += [missing_line(internal), ""]
    else:
        boot = internal.get("bootstrap") or {}
        lines += [f"Mean AUROC **{_fig(internal['mean'])}** over {internal['n_images']:,} images of {internal['n_patients']:,} patients "
                  f"(95% intervals from {boot.get('n_boot', '?')} bootstrap replicates resampling patients).", ""]
        lines += _table(["finding", "positives / negatives", "AUROC [95% CI]", "average precision"],
                        [[_name(f), f"{m['n_positive']} / {m['n_negative']}", _fig(m), number(m.get("ap"))]
                         for f, m in internal["per_finding"].items()])
    lines += ["### External validation", ""]
    external = s["external"]
    if external.get("status") == "missing":
        lines += [missing_line(external), ""]
    else:
        for name, m in external["sets"].items():
            lines += [f"**{name}**: mean AUROC **{_fig(m['mean'])}** over {m['n_images']:,} images of {m['n_patients']:,} patients.", ""]
            lines += _table(["finding", "AUROC [95% CI]"], [[_name(f), _fig(x)] for f, x in m["per_finding"].items()])
    lines += ["### Cross-validation", ""]
    cv = s["cv"]
    if cv.get("status") == "missing":
        lines += [missing_line(cv), ""]
    else:
        spread = cv.get("fold_mean_auroc") or {}
        sd = f" ± {number(spread['sd'])}" if spread.get("sd") is not None else ""
        lines += [f"Pooled out-of-fold mean AUROC **{_fig(cv['mean'])}** over {cv['n_images']:,} images of {cv['n_patients']:,} patients "
                  f"in {cv['folds']} folds; per fold {number(spread.get('mean'))}{sd} (mean ± sd).", ""]
    return lines


def _subgroups(s: dict) -> list[str]:
    rows = [[g["attribute"], g["group"], f"{g['n_images']} / {g['n_patients']}", estimate(g["auroc"], g["ci_low"], g["ci_high"]),
             _diff({"diff": g["gap"], "diff_ci_low": g["gap_ci_low"], "diff_ci_high": g["gap_ci_high"]}),
             "**below overall**" if g["below_overall"] else ""] for g in s["groups"]]
    return [f"Mean AUROC by group beside the whole test split's {number(s['overall_mean_auroc'])}; the gap's interval is paired "
            "(the same patients resampled on both sides).", "",
            *_table(["attribute", "group", "images / patients", "mean AUROC [95% CI]", "gap to all [95% CI]", ""], rows)]


def _baselines(s: dict) -> list[str]:
    rows = [[b["words"], estimate(b["mean_auroc"], b["ci_low"], b["ci_high"]), _diff(b),
             "beaten" if b["beaten"] else "**not shown to beat**",
             ", ".join(map(_name, b["findings_not_beaten"])) or "none"] for b in s["baselines"].values()]
    return [f"The model's mean AUROC is {number(s['model_mean_auroc'])}. Each baseline was fit on the training split and scored "
            "on the same test patients with the same bootstrap replicates, so model - baseline has a paired interval; an interval "
            "that includes 0 means the data do not show the model to be better.", "",
            *_table(["baseline", "mean AUROC [95% CI]", "model - baseline [paired 95% CI]", "verdict", "findings where not shown to beat it"], rows)]


def _calibration(s: dict) -> list[str]:
    return [f"Expected calibration error (ECE, 0 is perfect): mean {number(s['mean_ece'], 3)} over {len(s['per_finding'])} findings; "
            f"worst {_name(s['worst']['finding'])} ({number(s['worst']['ece'], 3)}).", "",
            *_table(["finding", "ECE"], [[_name(f), number(v, 3)] for f, v in s["per_finding"].items()])]


def _robustness(s: dict, max_drop: float) -> list[str]:
    rows = [[p["perturbation"], p["label"], number(p["clean"]), f"{number(p['worst_auroc'])} (level {p['worst_level']}, {p['worst_strength']:g})",
             signed(-p["drop"]), f"**more than {max_drop:g}**" if p["over_limit"] else ""] for p in s["perturbations"]]
    return ["Mean AUROC on the test images degraded on purpose, each perturbation at four growing strengths.", "",
            *_table(["perturbation", "strength in", "clean", "worst", "change", ""], rows)]


def _pointing(s: dict) -> list[str]:
    lines = [f"On {s['n']} boxed findings in held-out images ({s.get('splits') or 'test'}), the heatmap's strongest point fell inside "
             f"the radiologist's box **{percent(s['hit_rate'])}** of the time; a random point would have hit {percent(s['baseline'])}. "
             f"With a margin of {100 * (s.get('tolerance') or 0):.1f}% of the image side: {percent(s['hit_rate_tolerant'])} "
             f"against {percent(s['baseline_tolerant'])}.", ""]
    if s.get("per_finding"):
        lines += _table(["finding", "boxes", "hit rate", "random point"],
                        [[_name(f), p["n"], percent(p["hit_rate"]), percent(p["baseline"])] for f, p in s["per_finding"].items()])
    return lines


def card_markdown(card: dict) -> str:
    """The whole card as Markdown."""
    sections, thresholds = card["sections"], card["thresholds"]
    renderers = {"model": _model, "intended_use": _intended, "training_data": _training, "evaluation_data": _evaluation,
                 "metrics": _metrics, "subgroups": _subgroups, "baselines": _baselines, "calibration": _calibration,
                 "robustness": lambda s: _robustness(s, thresholds["max_robustness_drop"]), "pointing": _pointing}
    lines = [f"# Model card: {card['run'].rstrip('/').split('/')[-1]}", "",
             f"_Generated {card['generated']} from the files of the run `{card['run']}` (after Mitchell et al., \"Model Cards for "
             "Model Reporting\", 2019). Every figure and every limitation below is read or derived from those files; "
             "`model_card.json` holds the same facts._", ""]
    for key, title in SECTION_TITLES.items():
        part = sections[key]
        lines += [f"## {title}", ""]
        lines += [missing_line(part), ""] if part.get("status") == "missing" else renderers[key](part)
    lines += ["## Limitations", "",
              f"Derived from the numbers above by fixed rules: findings with fewer than {thresholds['min_test_positives']} positive "
              "test images, subgroups and external sets whose interval lies below the overall figure, findings and groups where the "
              "model is not shown to beat a baseline, perturbations costing more than "
              f"{thresholds['max_robustness_drop']:g} mean AUROC, and a pointing game no better than chance.", ""]
    lines += [f"- {x['text']}." for x in card["limitations"]] or ["- None of these rules found one in the sections evaluated above."]
    missing = [SECTION_TITLES[k] for k, part in sections.items() if part.get("status") == "missing"]
    missing += [f"Metrics ({name})" for name, part in sections["metrics"].items() if part.get("status") == "missing"]
    if missing:
        lines.append(f"- Not evaluated, so not judged: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"
