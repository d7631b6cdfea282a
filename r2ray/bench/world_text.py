"""Query text for the synthetic world: topic vocabularies and templates.

The text carries what a sentence encoder can pick up: the topic (its subjects and verbs), the
difficulty (openers such as "Quick question:" or "Olympiad problem:", and larger numbers for harder
math), and how long an answer should be ("Answer briefly." / "Explain step by step."). Cues agree
with the hidden truth most of the time (``CUE_FIDELITY``), not always, as in real traffic.
"""

from __future__ import annotations

import numpy as np

from r2ray.bench.world import TOPIC_NAMES, QueryFeatures

CUE_FIDELITY = 0.8     # chance a difficulty or length cue matches the hidden truth
EASY, HARD = 0.22, 0.5  # difficulty tier edges
DRAWS = 16             # uniforms per query: a fixed count keeps the stream independent of the vocab

OPENERS = (  # by difficulty tier, for every topic
    ("Quick question:", "Simple one:", "Easy question:", "A basic question:", "Beginner here:",
     "Just checking:"),
    ("", "", "Question:", "Homework:", "I need help with this:", "Can you help?"),
    ("Hard problem:", "A challenging, advanced question:", "Expert-level question:",
     "This is a tricky one:", "Graduate-level question:", "Difficult one, think carefully:"),
)
LEVEL_TAGS = (  # by difficulty tier, appended
    ("(easy)", "(beginner level)", "(simple)", "(basic)"),
    ("", "", "(intermediate)", "(medium difficulty)"),
    ("(advanced)", "(expert level)", "(hard)", "(very difficult)"),
)
LENGTH_CUES = (
    ("Answer briefly.", "Just the answer, please.", "One line is enough.", "Keep it short."),
    ("", "", "", "Thanks!"),
    ("Explain step by step.", "Please explain in detail.", "Walk me through your reasoning.",
     "Give a thorough, complete answer."),
)
COUNTRIES = ("France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Vietnam", "Peru", "Egypt",
             "Australia", "Poland", "Chile", "Morocco", "Thailand", "Ireland", "Mexico", "Finland",
             "Ghana", "Portugal", "Mongolia", "Nepal", "Uruguay", "Iceland", "Indonesia")
TOPIC_TEXT: dict[str, dict] = {
    "math": {
        "openers": (("Elementary arithmetic:", "Simple school exercise:"), ("Exercise:",),
                    ("Olympiad problem:", "Competition-level question, prove it rigorously:")),
        "verbs": ("Compute", "Find", "Determine", "Calculate", "Evaluate", "Work out"),
        "subjects": (
            "the integral of x^{a} from 0 to {b}", "the probability that two fair dice sum to {s}",
            "how many primes are below {c}", "the derivative of x^{a}·sin({b}x)",
            "the roots of x^2 - {a}x + {b} = 0", "the sum of the first {c} odd numbers",
            "the expected number of coin flips until {a} heads in a row",
            "the remainder when {c}^{a} is divided by {b}", "the limit of (1 + {a}/n)^n as n grows",
            "the greatest common divisor of {c} and {d}",
            "the number of ways to seat {a} people at a round table",
            "the eigenvalues of the matrix [[{a}, {b}], [{b}, {a}]]", "the volume of a sphere of radius {a}",
            "the variance of a binomial with n = {c} and p = 0.{a}", "the {a}th Fibonacci number modulo {b}",
        ),
    },
    "code": {
        "openers": (("Beginner coding question:",), ("Coding task:",),
                    ("Production-grade, performance-critical task:", "Tricky concurrency problem:")),
        "verbs": ("Write", "Implement", "Debug", "Code", "Show me", "Refactor"),
        "subjects": (
            "a Python function that reverses a linked list",
            "an SQL query that returns the top {a} customers by revenue",
            "a regular expression that validates ISO 8601 dates",
            "a binary search over a sorted array of {c} integers",
            "a thread-safe LRU cache with capacity {c} in Java",
            "a Rust iterator over the first {c} prime numbers",
            "a bash script that renames {c} log files by date",
            "a React component with a debounced search box", "a lock-free queue in C++",
            "a dynamic-programming solution to the knapsack problem with {a} items",
            "a Python decorator that retries a function {a} times",
            "a Go HTTP server with graceful shutdown", "a JavaScript function that deep-merges two objects",
            "a unit test for a CSV parser", "Dijkstra's shortest path for a graph with {c} nodes",
            "red-black tree insertion in C",
        ),
    },
    "science": {
        "openers": (("Science basics:",), ("Science question:",),
                    ("Research-level physics question:", "Advanced biochemistry question:")),
        "verbs": ("Explain", "Describe", "What do we know about", "Give an overview of"),
        "subjects": (
            "why the sky is blue", "how photosynthesis stores energy",
            "the difference between mitosis and meiosis", "how vaccines train the immune system",
            "the half-life of carbon-14", "how a transistor amplifies a signal", "Newton's third law",
            "entropy in an isolated system", "quantum entanglement", "plate tectonics",
            "the boiling point of water at {c} metres altitude", "Hawking radiation",
            "CRISPR gene editing", "the greenhouse effect", "the structure of DNA",
            "how neurons transmit signals", "the Doppler effect", "enzyme catalysis", "dark matter",
            "antibiotic resistance",
        ),
    },
    "factual": {
        "openers": (("Trivia:",), ("Fact check:",), ("Obscure trivia:", "Hard trivia question:")),
        "verbs": ("",),
        "subjects": (
            "What is the capital of {country}?", "Who wrote {book}?",
            "What is the chemical symbol for {element}?", "In which year did {event}?",
            "Roughly how many people live in {country}?", "What currency is used in {country}?",
            "Who painted {painting}?", "What is the atomic number of {element}?",
            "What language is mostly spoken in {country}?", "Which ocean is closest to {country}?",
        ),
    },
    "reasoning": {
        "openers": (("Simple riddle:",), ("Logic question:",),
                    ("Tricky logic puzzle:", "A hard brain-teaser:")),
        "verbs": ("",),
        "subjects": (
            "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies?",
            "A farmer has {c} sheep; all but {a} run away. How many are left?",
            "Ann is older than Ben and Ben is older than Cleo. Who is youngest of the {a} siblings?",
            "What comes next in the sequence {a}, {b}, {s}, ...?",
            "A train leaves at {a}:00 at {c} km/h; another leaves an hour later at {d} km/h. "
            "When does it catch up?",
            "If {a} machines make {a} widgets in {a} minutes, how long do {c} machines take for {c} widgets?",
            "In a room of {c} people everyone shakes hands once. How many handshakes are there?",
            "Three boxes are all mislabelled. How few draws tell which box holds what?",
            "Solve this logic grid: {a} houses, {a} owners, {a} pets. Who owns the zebra?",
            "A bat and a ball cost {b}.10 and the bat costs {b} more than the ball. What does the ball cost?",
        ),
    },
    "writing": {
        "openers": (("Something simple:",), ("Creative task:",),
                    ("Demanding literary task:", "In strict iambic pentameter:")),
        "verbs": ("Write", "Compose", "Draft", "Create"),
        "subjects": tuple(f"a {form} about {{theme}}" for form in (
            "short poem", "haiku", "limerick", "cover letter", "product description", "wedding toast",
            "short story", "blog post", "speech", "song chorus", "sonnet", "eulogy")),
    },
    "advice": {
        "openers": (("Simple advice:",), ("Advice needed:",), ("Complicated situation:",)),
        "verbs": ("How should I", "What is the best way to", "Any tips to", "Help me"),
        "subjects": (
            "prepare for a job interview", "ask my manager for a raise", "start running at {age}",
            "save for retirement", "learn Spanish in {a} months", "deal with a noisy neighbour",
            "negotiate my rent", "improve my sleep", "plan a trip to {country}",
            "talk to my teenager about screen time", "get over jet lag",
            "choose a first programming language",
        ),
    },
    "business": {
        "openers": (("Quick business task:",), ("Work task:",),
                    ("Board-level, high-stakes task:", "Complex business case:")),
        "verbs": ("Draft an email to the board about", "Summarise the key risks of",
                  "Write a one-page plan for", "Outline a pitch for", "Prepare meeting notes on"),
        "subjects": (
            "a delayed shipment", "the Q{q} budget overrun", "a pricing change", "a data breach",
            "the office move", "the new expense policy", "launching a subscription service",
            "moving our servers to the cloud", "opening a shop in {country}", "a {a}% price increase",
        ),
    },
}
FILLERS = {
    "book": ("Pride and Prejudice", "One Hundred Years of Solitude", "The Trial", "Beloved", "Dune",
             "Things Fall Apart", "The Master and Margarita", "Middlemarch", "Ulysses", "Hamlet"),
    "element": ("gold", "tungsten", "sodium", "iron", "mercury", "lead", "potassium", "silver", "tin",
                "xenon"),
    "event": ("the Berlin Wall fall", "the first Moon landing happen", "the Titanic sink",
              "World War I end", "the printing press appear in Europe", "the Euro launch"),
    "painting": ("the Mona Lisa", "The Starry Night", "Guernica", "The Night Watch", "The Scream",
                 "Girl with a Pearl Earring"),
    "theme": ("autumn in the city", "a lost umbrella", "our new coffee machine", "remote work",
              "the first day of school", "a retiring colleague", "the ocean at night",
              "a robot learning to paint", "a small bakery", "a rainy Monday"),
}


def _pick(options: tuple, u: float):
    return options[min(int(u * len(options)), len(options) - 1)]


def _tier(value: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.where(value < low, 0, np.where(value < high, 1, 2))


def render_queries(rng: np.random.Generator, features: QueryFeatures) -> list[str]:
    """One query text per row of ``features``; draws exactly ``DRAWS`` uniforms per query."""
    n = len(features.topic)
    u = rng.random((n, DRAWS))
    true_tier = _tier(features.difficulty, EASY, HARD)
    difficulty_tier = np.where(u[:, 0] < CUE_FIDELITY, true_tier, (u[:, 1] * 3).astype(int))
    length_tier = np.where(u[:, 2] < CUE_FIDELITY, _tier(features.detail, -0.6, 0.6),
                           (u[:, 3] * 3).astype(int))
    return [_render(TOPIC_NAMES[features.topic[i]], int(difficulty_tier[i]), int(length_tier[i]),
                    float(features.difficulty[i]), u[i]) for i in range(n)]


def _render(topic: str, difficulty_tier: int, length_tier: int, difficulty: float,
            u: np.ndarray) -> str:
    text = TOPIC_TEXT[topic]
    openers = OPENERS[difficulty_tier] + text["openers"][difficulty_tier]
    scale = 1.0 + 9.0 * difficulty ** 2  # harder queries carry larger numbers
    numbers = {
        "a": 2 + int(u[8] * 6 * scale), "b": 3 + int(u[9] * 20 * scale),
        "c": 10 + int(u[10] * 200 * scale ** 2), "d": 12 + int(u[11] * 300 * scale),
        "s": 2 + int(u[12] * 11), "q": 1 + int(u[12] * 4), "age": 20 + int(u[12] * 50),
        "country": _pick(COUNTRIES, u[13]),
    }
    numbers.update({name: _pick(options, u[14]) for name, options in FILLERS.items()})
    body = _pick(text["subjects"], u[6]).format(**numbers)
    verb = _pick(text["verbs"], u[5])
    if verb:
        body = f"{verb} {body}" + ("" if body.endswith("?") else
                                   "?" if verb.startswith(("How", "What", "Any")) else ".")
    parts = (_pick(openers, u[4]), body, _pick(LEVEL_TAGS[difficulty_tier], u[15]),
             _pick(LENGTH_CUES[length_tier], u[7]))
    return " ".join(p for p in parts if p)
