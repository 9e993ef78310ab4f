"""The teacher's key: every solution, and the answers to the syllabus's "predict before you run" questions.

``minilora exercises --solutions`` prints it. The student pages (the tutorials, the course site)
never show it: a student asks for one solution at a time with ``show_solution(id)``, after trying.

``PREDICT`` holds each question exactly as ``docs/syllabus.md`` words it (a test keeps the two
equal) with its answer. Where the answer is a measurement, it says which printed line of the
tutorial holds it rather than quoting a number that a run could contradict.
"""

from __future__ import annotations

from .harness import exercises

__all__ = ["PREDICT", "exercise_table", "teacher_key"]

# (tutorial, question as in docs/syllabus.md, answer)
PREDICT = [
    ("01", "`y = (x * x).sum()` for x = [1, 2, 3]: what is `x.grad` after `y.backward()`? And after a second "
           "`backward()` without zeroing?",
     "dy/dx = 2x = [2, 4, 6]. Gradients accumulate: a second backward() adds another 2x, so x.grad = [4, 8, 12]. "
     "That is why every training step calls zero_grad()."),
    ("01", "Central differences with ε = 1e-6: is the error of the gradient estimate smaller in float32 or float64? "
           "By roughly how much?",
     "float64, by many orders of magnitude. The rounding error of a central difference is about "
     "(machine epsilon × |f|) / ε: float32's epsilon (1.2e-7) over ε = 1e-6 is of the order of the gradient "
     "itself, float64's (2.2e-16) gives about 1e-10. Section 3 of tutorial 01 prints both errors at ε = 1e-6 and "
     "the ratio of the smallest ones."),
    ("02", "A fresh LoRA layer and the same Linear without an adapter get the same input. Are their outputs equal, "
           "close, or different?",
     "Equal, bit for bit: B starts at 0, so s·B A x = 0 exactly and h = W₀x + b."),
    ("02", "If A and B both started at zero, what would the first gradient of A be?",
     "Zero: ∂L/∂A = s·(grad_h B)ᵀ x vanishes with B = 0, and ∂L/∂B = s·grad_hᵀ (x Aᵀ) vanishes with A = 0. "
     "Both stay zero forever: nothing trains. One random factor breaks the symmetry."),
    ("02", "For a 1024 × 1024 matrix at r = 4, what fraction of the parameters does LoRA train?",
     "r·(d + k) / (d·k) = 4 · 2048 / 1,048,576 = 8,192 / 1,048,576 ≈ 0.78 %."),
    ("02", "Ten AdamW steps at the same learning rate, r = 1 and r = 64, scaling α/r: which update ‖ΔW‖_F is "
           "larger?",
     "r = 1's. Adam moves each entry by about the learning rate whatever the rank, so B A grows roughly like √r, "
     "and dividing by r over-corrects: ‖ΔW‖_F shrinks roughly like 1/√r. Section 6 of tutorial 02 prints the "
     "norms and the fitted exponents (rsLoRA's α/√r keeps them flat)."),
    ("03", "`apply_lora` with r = 4 on q and v of the 4-layer, d_model = 128 base: how many trainable parameters?",
     "|Θ| = 2 × L̂ × d_model × r = 2 × 8 × 128 × 4 = 8,192 (L̂ = 2 matrices × 4 blocks). That is 1.01 % of the "
     "base's 813,824 parameters, and 0.9966 % of the adapted model's 822,016, which counts A and B too."),
    ("03", "In `[bos] x [sep] y [eos]`, at which input positions does the loss count?",
     "Where the *target* (the next token) belongs to y or is [eos]: from the position of [sep] (which predicts "
     "y's first token) to the last token of y (which predicts [eos]). With n_prompt tokens [bos] x [sep] and "
     "n_tokens in all: positions n_prompt − 1 … n_tokens − 2. Never at [bos] or x, never at padding."),
    ("04", "AdamW's state for LoRA vs full fine-tuning: what ratio do you expect, and does the peak memory of a step "
           "shrink by the same ratio? Why not?",
     "AdamW keeps two values (m and v) per trainable parameter, so the ratio is |Φ| / |Θ| = 813,824 / 8,192 ≈ 99× "
     "for r = 4 on Wq, Wv. Peak memory shrinks far less: the frozen weights are still in memory, and the "
     "activations and their gradients, which do not depend on what trains, dominate a step of a model this "
     "small. Tutorial 04 prints the optimizer-state ratio, the weights + gradients + state ratio and each "
     "run's peak step memory."),
    ("04", "Does LoRA's step take less time than full fine-tuning's here? By how much, and why is it not |Θ|/|Φ|?",
     "Somewhat less; tutorial 04 prints both times per step (ms/step; the paper: about 25 % faster on GPT-3). The forward "
     "pass and the backward through the activations are the same work for both methods. LoRA saves the weight "
     "gradients of the frozen matrices (one of a Linear's three matmuls per step) and the optimizer update of "
     "Φ, and adds its thin matmuls, so at most about a third of the matmul work goes away, never 99 %."),
    ("05", "After `lora.merge`, how many matmuls does one adapted layer run, and how large is the largest "
           "|merged − unmerged| logit?",
     "One, as a plain Linear: x Wᵀ with W = W₀ + s·B A. The logits differ only by float32 rounding (the order "
     "of 1e-6 to 1e-5 for logits of order 10); section 2 of tutorial 05 prints it."),
    ("05", "Houlsby adapters at batch 1: more or less latency overhead than unmerged LoRA?",
     "More in the paper (Table 1: +20–30 % at batch 1 on a GPU): adapter layers add depth that runs in sequence, "
     "while LoRA's thin matmuls sit beside W₀x, and merged LoRA adds nothing. On this CPU each small matmul "
     "carries a fixed overhead, so the percentages differ; tutorial 05 prints each model's overhead over the "
     "base with a verdict against the timing noise."),
    ("05", "In a mixed batch, does a row's output depend on which adapters the other rows use?",
     "No. Each row gets W₀x + b plus its own adapter's s·B(Ax) (nothing for '__base__'); tutorial 05 runs every "
     "row again with its adapter alone and compares the generations."),
    ("06", "Does quality keep rising from r = 1 to r = 64 on these tasks?",
     "No: it rises over the first few ranks and then stays flat, at a rank still tiny next to d = 128. On "
     "sql, whose two new keywords need more than one direction of update, r = 1 is not enough; tutorial 06 "
     "prints the three-seed verdict of `minilora experiment rank` and the smallest rank within noise of "
     "r = 64 (Table 6: on GPT-3, r = 1 on Wq and Wv is already as good as r = 64). In the test NLL, the step "
     "from the base model to any rank is far larger than the differences between ranks."),
    ("06", "φ between two random 8-dimensional subspaces of R^128: close to 0, close to 1, or in between?",
     "Close to 0: E[φ] = max(i, j) / k = 8 / 128 = 0.0625 (exercise 06.2). Any trained φ well above that is "
     "shared structure, not chance."),
    ("07", "`np.exp(a)` on a CuPy array: what happens? And `float(a.sum())`?",
     "CuPy implements NumPy's ufunc protocol (NEP 13), so np.exp(a) is handed to cupy.exp and returns a CuPy "
     "array; NumPy functions CuPy does not implement fail instead, and np.asarray(a) always raises. The strict "
     "backend refuses every NumPy function on a device array, so code written with xp = get_array_module(a) "
     "runs on every version. float(a.sum()) works: a one-element array is copied to the host (a GPU sync)."),
    ("08", "GPT-2 keeps q, k and v in one (d, 3d) matrix. With LoRA on q and v only, how many rows of c_attn's B "
           "are zero?",
     "d of its 3d rows: the middle block, k's (128 of 384 here, 768 of 2,304 for GPT-2 small). B is "
     "(3d, 2r) = [B_q 0; 0 0; 0 B_v], so the q and v rows are zero in half their columns too (exercise 08.2)."),
    ("09", "A 4-bit NF4 weight with one float32 scale per 64 values: how many bits per value in all?",
     "4 + 32 / 64 = 4.5 bits. QLoRA's double quantization stores the scales in 8 bits with one float32 per 256 "
     "of them: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits (exercise 09.3 counts the bytes)."),
    ("09", "DoRA with B = 0 and m = ‖W₀‖_row: is its output equal to the base model's?",
     "Yes (up to rounding): W′ = m ⊙ W₀ / ‖W₀‖_row = W₀ when B = 0 and m = ‖W₀‖_row, so DoRA starts at the base, "
     "as LoRA does."),
]


def exercise_table() -> str:
    """One line per exercise: id, check, title, the paper (what ``minilora exercises`` prints)."""
    rows = [f"{'id':<5} {'check':<32} {'exercise':<38} the paper"]
    rows += [f"{e.id:<5} {e.check:<32} {e.title:<38} {e.paper}" for e in exercises()]
    rows += ["", "In Python: show_hint(id) for a hint, show_solution(id) for one solution. "
                 "`minilora exercises --solutions` prints the teacher's key."]
    return "\n".join(rows)


def teacher_key() -> str:
    """Every solution, in tutorial order, then the answers to the "predict before you run" questions."""
    parts = ["# The teacher's key of the minilora course (keep it away from the students)", "",
             "## Solutions of the exercises", ""]
    for e in exercises():
        parts += [f"### {e.id} · {e.title}  ({e.check}; {e.paper})", "", e.solution.rstrip(), ""]
    parts += ["## Predict before you run: answers", ""]
    for tutorial, question, answer in PREDICT:
        parts += [f"[{tutorial}] {question}", f"    {answer}", ""]
    return "\n".join(parts)
