"""One line to stderr in one write: ranks that share a stderr (forked ranks, a launcher's pipe, a Slurm log)
never interleave mid-line, which ``print`` allows because it writes the text and its newline separately."""
import sys


def say(line: str) -> None:
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
