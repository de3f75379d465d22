"""One-line description of the machine a benchmark ran on."""
from kvdirect.runtime import machine_description


def describe() -> str:
    return machine_description()
