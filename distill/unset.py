"""The one rule for "unset" option values, shared by every module (config re-exports it)."""


def is_unset(value) -> bool:
    """True for None, "" (or blanks) and the literal string None/none: the seed CLI and the launch
    scripts pass `None` for "unset". The one rule for every optional value (config, models, data)."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "none"))
