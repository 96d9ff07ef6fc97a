"""The error every tokenizer reader raises (mmadapter.tokenizer re-exports it)."""


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or unsupported, or a chat template cannot be rendered."""
