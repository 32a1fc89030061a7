"""The pure-torch ``expand_kernel`` fallback against a direct reference, and through vLLM."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.compat.cpu_expand_kernel import expand_kernel_impl

SENTINEL = 7


def reference_expand(
    output: list[float],
    values: list[float],
    counts: list[int],
    replace_from: float,
    replace_to: float,
    max_num_tokens: int | None,
) -> list[float]:
    out = list(output)
    start = 0
    for value, count in zip(values, counts):
        written = count if max_num_tokens is None else min(count, max_num_tokens)
        for j in range(written):
            out[start + j] = replace_to if value == replace_from else value
        start += count
    return out


def test_docstring_example() -> None:
    output = torch.empty(6, dtype=torch.float32)
    expand_kernel_impl(
        output, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2, 5, 6], dtype=torch.int32), -1, 1
    )
    assert output.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.int32, torch.int64]),
    values=st.lists(st.integers(-2, 5), max_size=8),
    data=st.data(),
    replace_from=st.integers(-2, 1),
    replace_to=st.integers(0, 9),
    max_num_tokens=st.one_of(st.none(), st.integers(1, 6)),
    cu_dtype=st.sampled_from([torch.int32, torch.int64]),
    extra=st.integers(0, 3),
)
def test_matches_reference(
    dtype: torch.dtype,
    values: list[int],
    data: st.DataObject,
    replace_from: int,
    replace_to: int,
    max_num_tokens: int | None,
    cu_dtype: torch.dtype,
    extra: int,
) -> None:
    counts = data.draw(st.lists(st.integers(0, 6), min_size=len(values), max_size=len(values)))
    total = sum(counts)
    cu = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(cu_dtype)
    output = torch.full((total + extra,), SENTINEL, dtype=dtype)

    expand_kernel_impl(
        output, torch.tensor(values, dtype=dtype), cu, replace_from, replace_to, max_num_tokens
    )

    expected = reference_expand(
        [SENTINEL] * (total + extra), values, counts, replace_from, replace_to, max_num_tokens
    )
    assert output.tolist() == expected


def test_float_values_keep_their_fraction() -> None:
    # Temperatures and top_p are float32: they must not be truncated to integers.
    output = torch.zeros(4, dtype=torch.float32)
    expand_kernel_impl(
        output, torch.tensor([0.8, 0.25]), torch.tensor([3, 4], dtype=torch.int32), -1.0, 1.0, 32
    )
    assert torch.allclose(output, torch.tensor([0.8, 0.8, 0.8, 0.25]))


def test_vllm_expand_batch_to_tokens_uses_the_fallback() -> None:
    """Through vLLM's own kernel-override path, as the rejection sampler calls it on CPU."""
    import specserve_vllm
    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    specserve_vllm.register()
    current_platform.register_triton_kernel_overrides()

    cu = torch.tensor([3, 3, 5], dtype=torch.int32)
    temperature = expand_batch_to_tokens(
        torch.tensor([0.8, 0.5, -1.0]), cu, 5, replace_from=-1, replace_to=1
    )
    top_k = expand_batch_to_tokens(torch.tensor([50, 3, 7], dtype=torch.int32), cu, 5)
    assert torch.allclose(temperature, torch.tensor([0.8, 0.8, 0.8, 1.0, 1.0]))
    assert top_k.tolist() == [50, 50, 50, 7, 7]
