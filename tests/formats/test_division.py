"""divide(x, c) is the correctly rounded quotient on every device (scales must not depend on the device)."""

from __future__ import annotations

import pytest
import torch

from quantport.formats.division import divide

DIVISORS = (448.0, 2688.0, 7.0, 127.0, 6.0)


def _amaxes() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.rand(4096, generator=gen) * 10.0 ** torch.randint(-30, 30, (4096,), generator=gen),
            torch.tensor([0.0, 1.0, 448.0, 2688.0, 7.0, 3.4e38, 1e-38]),
        ]
    )


@pytest.mark.parametrize("divisor", DIVISORS)
def test_divide_is_the_correctly_rounded_quotient_on_cpu(divisor):
    x = _amaxes()
    exact = (x.double() / divisor).float()  # double quotient, then one rounding: correct for fp32 inputs
    assert torch.equal(divide(x, divisor), exact)
    assert torch.equal(divide(x, divisor), x / divisor)


def test_divide_keeps_dtype_and_shape():
    x = torch.ones(3, 2, dtype=torch.bfloat16)
    assert divide(x, 7.0).dtype == torch.bfloat16 and divide(x, 7.0).shape == (3, 2)
    assert divide(torch.tensor(448.0), 448.0).item() == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("divisor", DIVISORS)
def test_divide_on_cuda_equals_cpu(divisor):
    x = _amaxes()
    assert torch.equal(divide(x.cuda(), divisor).cpu(), divide(x, divisor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("element_max", [6.0, 448.0])
def test_mx_shared_exponent_on_cuda_equals_cpu_at_powers_of_two(element_max):
    from quantport.formats.mx import mx_shared_exponent

    # amax = element_max * 2**k: the quotient is exactly 2**k, where a reciprocal multiply may land one ulp
    # above and ceil(log2(.)) one exponent higher
    amax = torch.cat([element_max * torch.exp2(torch.arange(-40.0, 40.0)), _amaxes()])
    assert torch.equal(mx_shared_exponent(amax.cuda(), element_max).cpu(), mx_shared_exponent(amax, element_max))
