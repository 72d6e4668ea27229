"""The normrnn bench suite (installed as ``normrnn.bench``): ``python -m normrnn bench``.

Times, in one process and interleaved, the fused layers (``backend="triton"``), the eager
reference, the reference under ``torch.compile``, torch's cuDNN modules (the unnormalized speed
bar), and Haste and FlashRNN when they import; checks the fused layers against the float64
reference at scale; writes JSON, a markdown table and plots under ``bench/results/``.
"""
