"""Explainers: each writes an explanation of a feature from marked excerpts and answers the two scoring
questions about it (Bills et al. 2023; EleutherAI delphi; SAEBench's autointerp):

  explain(excerpts)               excerpts whose active tokens are marked -> a short explanation
  detect(explanation, excerpts)   which excerpts does the feature fire on (marks ignored)
  fuzz(explanation, excerpts)     in which excerpts are the marked tokens the ones it fires on

An excerpt is (pieces, marked): its tokens' text and one flag per token.

OfflineExplainer needs no network and is deterministic: its explanation is a list of quoted terms, each the
exact text of one token or of a token and the one before it, picked greedily from the active tokens by
new active tokens covered x precision over the excerpts' tokens; its scorer marks a token that ends a quoted
term of the explanation. It gives a floor, not the scores an LLM explainer gives.

ChatExplainer asks an OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, ollama, a hosted API;
the key from $OPENAI_API_KEY if set) the same three questions, with prompts in SAEBench's and delphi's style.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter

from saebench.errors import DataError

Excerpt = tuple[list[str], list[bool]]
MAX_TERM_TOKENS = 2  # the offline explainer's n-grams: a token, or a token and the one before it
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def render(pieces: list[str], marked: list[bool] | None = None) -> str:
    """An excerpt as text, marked tokens as <<token>>, newlines as ↵ (SAEBench's Example.to_str)."""
    marked = marked or [False] * len(pieces)
    return "".join(f"<<{p}>>" if m else p for p, m in zip(pieces, marked, strict=True)).replace("\n", "↵")


def quoted_terms(explanation: str) -> set[str]:
    """The JSON-quoted strings of an explanation."""
    terms = set()
    for q in _QUOTED.findall(explanation):
        try:
            terms.add(json.loads(q))
        except ValueError:
            terms.add(q[1:-1])
    return terms - {""}


def term_ends(pieces: list[str], terms: set[str], span: int = 4) -> list[bool]:
    """Per token: does the text of it and up to span - 1 tokens before it equal one of the terms."""
    out = []
    for i in range(len(pieces)):
        text, hit = "", False
        for j in range(i, max(-1, i - span), -1):
            text = pieces[j] + text
            hit = hit or text in terms
        out.append(hit)
    return out


class OfflineExplainer:
    """Explains by the tokens and bigrams the feature fires on; scores by matching them (module docstring)."""

    def __init__(self, n_terms: int = 5):
        self.n_terms = n_terms
        self.name = "offline"

    def explain(self, excerpts: list[Excerpt]) -> str:
        fires: Counter[str] = Counter()
        covers: dict[str, set[tuple[int, int]]] = {}
        for e, (pieces, marked) in enumerate(excerpts):
            for i in range(len(pieces)):
                for n in range(1, min(MAX_TERM_TOKENS, i + 1) + 1):
                    term = "".join(pieces[i - n + 1 : i + 1])
                    fires[term] += 1
                    if marked[i]:
                        covers.setdefault(term, set()).add((e, i))
        left = set().union(*covers.values()) if covers else set()
        chosen: list[str] = []
        while left and len(chosen) < self.n_terms:
            best = max(sorted(covers), key=lambda t: len(covers[t] & left) * len(covers[t]) / fires[t])
            if not covers[best] & left:
                break
            chosen.append(best)
            left -= covers[best]
        return ", ".join(json.dumps(t, ensure_ascii=False) for t in chosen)

    def detect(self, explanation: str, excerpts: list[Excerpt]) -> list[bool]:
        terms = quoted_terms(explanation)
        return [any(term_ends(pieces, terms)) for pieces, _ in excerpts]

    def fuzz(self, explanation: str, excerpts: list[Excerpt]) -> list[bool]:
        terms = quoted_terms(explanation)
        out = []
        for pieces, marked in excerpts:
            hits = sum(h and m for h, m in zip(term_ends(pieces, terms), marked, strict=True))
            out.append(any(marked) and 2 * hits >= sum(marked))
        return out


INTRO = (
    "We study the features of a sparse autoencoder trained on a language model's activations. Each feature "
    "fires on particular tokens, words, substrings or concepts in a text."
)
EXPLAIN_PROMPT = (
    f"{INTRO} Below are text excerpts on which one feature fires, strongest first; the tokens where it fires "
    "are marked <<like this>>. Say in one short sentence (at most 20 words, no formatting, no long lists) "
    "what the feature fires on. Cover most of the marked tokens rather than a single one, and mind "
    'capitalisation and punctuation where they matter. Answer in the form "This feature fires on ...".'
)
DETECT_PROMPT = (
    f"{INTRO} You get an explanation of what one feature fires on and {{n}} numbered text excerpts. "
    "List the numbers of the excerpts where the feature fires at least once, on any of their tokens, "
    'comma-separated (for example "{example}"), or answer "None". Answer with the numbers or None only.'
)
FUZZ_PROMPT = (
    f"{INTRO} You get an explanation of what one feature fires on and {{n}} numbered text excerpts in which "
    "some tokens are marked <<like this>>. In some excerpts the marked tokens are the ones the feature fires "
    "on; in the others they were marked at random. List the numbers of the excerpts whose marks are right, "
    'comma-separated (for example "{example}"), or answer "None". Answer with the numbers or None only.'
)


class BadAnswer(DataError):
    """The endpoint answered, but not with what the prompt asked for (that feature goes unscored)."""


class ChatExplainer:
    """The three questions put to an OpenAI-compatible chat endpoint (`url`: its base, e.g. http://host:8000/v1)."""

    def __init__(self, url: str, model: str, timeout: float = 60.0, seed: int = 0):
        self.url = url.rstrip("/")
        self.url += "" if self.url.endswith("/chat/completions") else "/chat/completions"
        self.model, self.timeout, self.seed = model, timeout, seed
        self.name = f"{model or 'chat'} at {url}"

    def ask(self, system: str, user: str, max_tokens: int) -> str:
        """One chat completion (temperature 0); an unreachable, slow or foreign endpoint is a DataError."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": self.seed,
        }
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        where = f"explainer {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            return str(reply["choices"][0]["message"]["content"]).strip()
        except TimeoutError:
            raise DataError(
                f"{where}: no answer within {self.timeout:g} s; check the server or raise eval.interp.timeout"
            ) from None
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip().splitlines()[:1]
            raise DataError(
                f"{where}: HTTP {e.code} {' '.join(detail)[:200]}; check --explainer-model and the server"
            ) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise DataError(f"{where}: no answer within {self.timeout:g} s; check the server") from None
            raise DataError(f"{where}: cannot connect ({e.reason}); start the server or fix --explainer") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(
                f"{where}: the answer is not an OpenAI chat completion; give --explainer the server's /v1 base URL"
            ) from None

    def explain(self, excerpts: list[Excerpt]) -> str:
        listing = "\n".join(f"{i}. {render(p, m)}" for i, (p, m) in enumerate(excerpts, 1))
        answer = self.ask(EXPLAIN_PROMPT, f"The excerpts:\n\n{listing}", 60)
        return re.split(r"(?:fires|activates) on", answer)[-1].strip().rstrip(".").strip()

    def _choose(self, prompt: str, explanation: str, excerpts: list[Excerpt], marks: bool) -> list[bool]:
        n = len(excerpts)
        listing = "\n".join(f"{i}. {render(p, m if marks else None)}" for i, (p, m) in enumerate(excerpts, 1))
        system = prompt.format(n=n, example=", ".join(str(i) for i in range(2, n + 1, 3)))
        answer = self.ask(
            system, f"The explanation: this feature fires on {explanation}.\n\nThe excerpts:\n\n{listing}", 60
        )
        picked = set()
        for item in answer.strip().rstrip(".").replace(" and ", ",").split(","):
            item = item.strip()
            if item.lower() in ("", "none"):
                continue
            if not item.isdigit() or not 1 <= int(item) <= n:
                one_line = " ".join(answer.split())[:80]
                raise BadAnswer(f"explainer {self.url} answered {one_line!r}, not excerpt numbers from 1 to {n}")
            picked.add(int(item))
        return [i in picked for i in range(1, n + 1)]

    def detect(self, explanation: str, excerpts: list[Excerpt]) -> list[bool]:
        return self._choose(DETECT_PROMPT, explanation, excerpts, marks=False)

    def fuzz(self, explanation: str, excerpts: list[Excerpt]) -> list[bool]:
        return self._choose(FUZZ_PROMPT, explanation, excerpts, marks=True)


Explainer = OfflineExplainer | ChatExplainer
