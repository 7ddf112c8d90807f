"""The trainer's console output: log lines and progress bars."""

from __future__ import annotations


def log(msg: str) -> None:
    print(f"[train-drafter] {msg}", flush=True)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)
    except ImportError:  # a plain line every few percent
        class Line:
            def __init__(self):
                self.n, self.last = 0, -1

            def update(self, k=1):
                self.n += k
                pct = int(100 * self.n / max(total, 1))
                if pct // 5 != self.last // 5:
                    self.last = pct
                    print(f"{desc}: {self.n}/{total} ({pct}%)", flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return Line()
