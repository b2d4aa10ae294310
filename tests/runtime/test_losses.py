"""The built-in losses against torch's own."""

import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from torch.func import grad, hessian, vmap

from basinprobe.runtime.losses import cross_entropy


def test_cross_entropy_equals_torch_with_its_derivatives():
    torch.manual_seed(0)
    z, y = 3 * torch.randn(50, 7, dtype=torch.float64), torch.randint(0, 7, (50,))
    torch.testing.assert_close(cross_entropy(z, y), F.cross_entropy(z, y), rtol=1e-15, atol=0)
    torch.testing.assert_close(grad(cross_entropy)(z, y), grad(F.cross_entropy)(z, y), rtol=1e-13, atol=1e-17)
    torch.testing.assert_close(hessian(cross_entropy)(z[:5], y[:5]), hessian(F.cross_entropy)(z[:5], y[:5]),
                               rtol=1e-13, atol=1e-17)
    stacked = torch.randn(4, 50, 7, dtype=torch.float64)
    torch.testing.assert_close(vmap(cross_entropy, in_dims=(0, None))(stacked, y),
                               torch.stack([F.cross_entropy(s, y) for s in stacked]), rtol=1e-15, atol=0)


def test_cross_entropy_under_vmap_does_not_import_sympy():
    """F.cross_entropy under vmap decomposes nll_loss, whose checks import sympy (~0.6 s)."""
    script = textwrap.dedent("""
        import sys, torch
        from basinprobe.runtime.losses import cross_entropy
        torch.func.vmap(cross_entropy, in_dims=(0, None))(torch.randn(3, 8, 4), torch.arange(8) % 4)
        print("sympy" in sys.modules)
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.split() == ["False"]
