"""Placeholder replaced by the Triton backend (issue 4)."""
def unsupported_reason(cell, norm, x, nonlinearity):
    return "the Triton backend is not built yet"
def describe_availability(probe):
    return "not usable: the Triton backend is not built yet"
