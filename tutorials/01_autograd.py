# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 01 · Autograd: tensors, the graph, a backward pass by hand, gradcheck
#
# LoRA (Hu et al. 2021, arXiv 2106.09685) is a statement about *gradients*: train a tiny
# low-rank Θ and leave the pre-trained Φ₀ frozen (eq. 2). Before we can see that, we need the
# machine that computes gradients. minilora has a small one, written on NumPy, and in this
# first tutorial you look inside it.
#
# You will:
# 1. build a tensor expression and look at the graph it records;
# 2. run `backward()` and then do the same backward pass by hand;
# 3. check a backward pass against finite differences with `ml.gradcheck`, and watch it catch
#    a planted bug.
#
# Run this file as a script (`python tutorials/01_autograd.py`) or open it as a notebook
# (`jupytext --to notebook tutorials/01_autograd.py`).

# %%
import inspect

import numpy as np

import minilora as ml
from minilora.exercises import check_backward_by_hand, check_sigmoid, save_figure, show_hint, show_solution

ml.manual_seed(0)

# %% [markdown]
# ## 1. Tensors and the graph they record
#
# A `Tensor` holds an array (`.data`, NumPy here, CuPy on a GPU), and, when it takes part in a
# gradient computation, three more things: `.requires_grad`, `.grad` (filled by `backward`),
# and `.creator`, the operation that made it. Leaves — tensors you create — have no creator.
#
# We use float64 throughout this tutorial, because gradient checks need it (section 3 shows why).

# %%
x = ml.tensor([[0.5, -1.0, 2.0], [1.5, -0.25, 0.75]], requires_grad=True, dtype="float64")  # (2, 3)
w = ml.tensor([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]], requires_grad=True, dtype="float64")   # (3, 2)

h = x @ w          # (2, 2)
y = h.tanh()       # (2, 2)
L = y.sum()        # a scalar: the "loss"
print(L)

# %% [markdown]
# Every result remembers its creator, and every creator remembers its inputs. Walking from `L`
# back to the leaves shows the graph that `backward` will sweep in reverse:

# %%
def show_graph(t, depth=0):
    """Print the Functions behind tensor t, one per line, indented by distance from t."""
    if t.creator is None:
        kind = "leaf, requires_grad" if t.requires_grad else "leaf"
        print("  " * depth + f"Tensor{tuple(t.shape)}  ({kind})")
        return
    print("  " * depth + f"Tensor{tuple(t.shape)}  <- {type(t.creator).__name__}")
    for parent in t.creator.inputs:
        if isinstance(parent, ml.Tensor):
            show_graph(parent, depth + 1)


show_graph(L)

# %% [markdown]
# Each box of that graph is a `Function` whose `forward` and `backward` sit side by side. Here
# is the whole of `Tanh` — the backward uses the saved output, because d tanh(h)/dh = 1 − tanh(h)²:

# %%
print(inspect.getsource(type(y.creator)))

# %% [markdown]
# ## 2. A backward pass — by the library, then by hand
#
# `L.backward()` sorts the graph's Functions (children before parents), then hands each one the
# gradient of its output and adds the gradients it returns into its inputs. Leaves that require
# grad collect theirs in `.grad`.

# %%
L.backward()
print("dL/dx =\n", x.grad)
print("dL/dw =\n", w.grad)

# %% [markdown]
# Now the same thing on paper. Going backwards through L = Σ y, y = tanh(h), h = x w:
#
# - dL/dy = 1 everywhere (a sum passes its gradient unchanged to every element);
# - dL/dh = dL/dy ⊙ (1 − tanh(h)²) (elementwise);
# - dL/dx = (dL/dh) wᵀ and dL/dw = xᵀ (dL/dh) (the two halves of the matmul's backward).
#
# Each line is one Function's `backward`. In NumPy:

# %%
h_np = x.data @ w.data
dL_dh = np.ones_like(h_np) * (1 - np.tanh(h_np) ** 2)
dL_dx = dL_dh @ w.data.T
dL_dw = x.data.T @ dL_dh
print("by hand == autograd:", np.allclose(dL_dx, x.grad), np.allclose(dL_dw, w.grad))

# %% [markdown]
# Two details worth a moment:
#
# - Gradients **accumulate**. Call `L.backward()` again and `x.grad` doubles; an optimizer
#   calls `zero_grad()` between steps.
# - A tensor with `requires_grad=False` gets **no** gradient at all — not a zero array, `None`.
#   That is how LoRA freezes W₀: its gradient is never computed, let alone stored (Sec. 4.2).

# %%
frozen = ml.tensor(w.data.copy(), dtype="float64")  # requires_grad=False
(x @ frozen).tanh().sum().backward()
print("frozen.grad is", frozen.grad)

# %% [markdown]
# ## 3. gradcheck: trust, but verify
#
# A hand-written backward can be wrong in ways that still "train" (a missing factor of 2, a
# transpose). `ml.gradcheck(fn, inputs)` compares the analytic gradient with **central
# differences**, (f(x + ε) − f(x − ε)) / 2ε, element by element, for every input that requires
# grad. It uses a *random* upstream gradient, not all ones: an all-ones upstream hides a backward
# that forgets to multiply by its incoming gradient.

# %%
print(ml.gradcheck(lambda x, w: (x @ w).tanh(), [x, w]))

# %% [markdown]
# ### Why float64, and why ε = 1e-6?
#
# A finite difference has two errors: the truncation error of the formula (∝ ε² for central
# differences) and the rounding error of subtracting two nearly equal numbers (∝ machine
# epsilon / ε). Their sum is smallest in between. The plot measures it for one element of
# dL/dx above, in float64 and float32.

# %%
from matplotlib.figure import Figure


def central_difference(eps, dtype):
    """(L(x + eps e_0) − L(x − eps e_0)) / 2 eps for the first element of x, in ``dtype``."""
    values = []
    for sign in (+1, -1):
        x_shift = x.data.astype(dtype)
        x_shift[0, 0] += sign * eps
        with ml.no_grad():
            values.append(float((ml.tensor(x_shift) @ ml.tensor(w.data.astype(dtype))).tanh().sum().item()))
    return (values[0] - values[1]) / (2 * eps)


exact = float(dL_dx[0, 0])
epsilons = np.logspace(-12, -1, 45)
fig = Figure(figsize=(6.4, 3.8))
ax = fig.add_subplot(1, 1, 1)
errors = {}
for dtype in ("float64", "float32"):
    errors[dtype] = np.array([abs(central_difference(e, dtype) - exact) + 1e-18 for e in epsilons])
    ax.loglog(epsilons, errors[dtype], marker=".", label=dtype)
ax.axvline(1e-6, color="grey", linestyle="--", linewidth=0.8)
ax.text(1.3e-6, 1e-8, "gradcheck's ε = 1e-6", fontsize=8, color="grey")
ax.set_xlabel("ε")
ax.set_ylabel("|central difference − exact dL/dx₀₀|")
ax.set_title("Finite-difference error: rounding (left) vs truncation (right)", fontsize=10)
ax.legend()
save_figure(fig, "01_finite_difference_error.png")
at_gradcheck = int(np.argmin(np.abs(np.log(epsilons / 1e-6))))  # the ε of the grid closest to 1e-6
print(f"the exact dL/dx₀₀ = {exact:.6f}")
for dtype, err in errors.items():
    best = int(np.argmin(err))
    print(f"{dtype}: smallest error {err[best]:.1e} at ε = {epsilons[best]:.1e}; "
          f"at ε = 1e-6 the error is {err[at_gradcheck]:.1e} ({err[at_gradcheck] / abs(exact):.1e} of the gradient)")
print(f"float32's smallest error is {errors['float32'].min() / errors['float64'].min():.0e} times float64's")

# %% [markdown]
# Read the lines printed below the figure. In float64 the error falls by many orders of
# magnitude before rounding takes over, and it is still tiny at gradcheck's ε = 1e-6. In float32
# the smallest error is far larger, and at ε = 1e-6 the difference is rounding noise of the
# order of the gradient itself (to the left, x + ε rounds back to x and the difference is 0).
# float32 cannot tell a right gradient from a slightly wrong one. That is why
# `gradcheck` refuses float32 inputs, and why minilora trains in float32 but checks in float64.
#
# ### The planted bug
#
# Here is a classic mistake. `a * a.detach()` computes a² in the forward pass, but the
# `detach()` cuts one of the two paths from a to the result, so backward returns a instead
# of 2a. Nothing crashes; training would just be wrong. gradcheck catches it and says where:

# %%
a = ml.tensor([[0.5, -1.0, 2.0], [1.5, -0.25, 0.75]], requires_grad=True, dtype="float64")
try:
    ml.gradcheck(lambda a: (a * a.detach()).sum(), [a])
except ml.GradcheckError as error:
    print("GradcheckError:", error)

# %% [markdown]
# The message names the input, the worst element, the two values (the analytic one is half the
# numeric one: the missing path) and the tolerances. The fixed version passes:

# %%
print(ml.gradcheck(lambda a: (a * a).sum(), [a]))

# %% [markdown]
# Every op in minilora — and, in the next tutorial, the LoRA layer itself — is tested this way.
#
# ## Exercises
#
# **Exercise 1 — a backward pass by hand.** For L = Σ (tanh(x) w)², with x of shape (N, k) and
# w of shape (k, m), write `my_backward(x, w)` returning `(dL/dx, dL/dw)` as NumPy arrays. Go
# backwards one Function at a time, as in section 2. `check_backward_by_hand` compares your
# arrays with minilora's `x.grad` and `w.grad`.

# %%
def my_backward(x, w):
    # a = np.tanh(x); h = a @ w; L = (h ** 2).sum()
    raise NotImplementedError  # your code here: return dx, dw


check_backward_by_hand(my_backward)

# %% [markdown]
# **Exercise 2 — your own Function.** Write the sigmoid σ(x) = 1 / (1 + e^(−x)) as an
# `ml.Function`: `forward(self, x)` gets a raw array and returns one; `backward(self, grad)`
# returns the gradient for x. Save what backward needs with `self.save_for_backward(...)` and
# read it back from `self.saved`. `check_sigmoid` compares the forward with NumPy and runs
# `ml.gradcheck` on your backward.

# %%
class MySigmoid(ml.Function):
    def forward(self, x):
        raise NotImplementedError  # your code here

    def backward(self, grad):
        raise NotImplementedError  # your code here


check_sigmoid(MySigmoid)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("01.1")` gives a hint (`show_hint("01.1", 2)` the
# formula), and `show_solution("01.1")` prints a solution.

# %% [markdown]
# **Next:** [`02_lora_layer.py`](02_lora_layer.py) — the LoRA layer h = W₀x + (α/r)·B A x, its backward derived on
# paper and checked with exactly this gradcheck.
