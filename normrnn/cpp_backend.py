"""Placeholder replaced by the C++ backend (issue 7)."""
def unsupported_reason(cell, norm, x, nonlinearity):
    return "the compiled CPU backend is not built yet"
def describe_availability(probe):
    return "not usable: the compiled CPU backend is not built yet"
