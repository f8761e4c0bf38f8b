"""User-facing errors: one line naming the problem and the fix."""

__all__ = ["TrustVisionError"]


class TrustVisionError(Exception):
    """An error a user can cause (bad name, bad file, bad shape).

    The message is a single line that names the problem and how to fix it. The command line
    prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
