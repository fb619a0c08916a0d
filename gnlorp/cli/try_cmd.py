"""`gnlorp try`: a run or an exported model generating text or classifying a sentence, in the terminal."""

from __future__ import annotations

import argparse
import sys

from ..atomic import strict_json
from .args import int_in_range


def add_try(commands: argparse._SubParsersAction) -> None:
    from gnlorp.export import infer

    parser = commands.add_parser(
        "try", help="generate text or classify a sentence with a run or an exported model",
        description="Load a run folder (its final weights, adapters merged in; its latest checkpoint while it has "
        "no final weights) or an exported model folder. With --prompt a causal LM streams its continuation to "
        "stdout; with --messages it streams the assistant's next turn; with --text a classifier prints the label "
        "and every class's probability.",
    )
    parser.add_argument("--model", required=True, help="a run folder (gnlorp train) or a model folder (gnlorp export)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="text for a causal LM to continue (or to answer, with a chat template)")
    given.add_argument("--text", help="a sentence for a classifier to label")
    given.add_argument("--messages", help="a conversation as JSON, [{\"role\": \"user\", \"content\": \"Hi\"}, ...], "
                       "for a causal LM with a chat template to answer the last user message")
    parser.add_argument("--base", action="store_true",
                        help="try the run's starting point before training instead, to compare with the same prompt "
                        "and seed")
    parser.add_argument("--max-new-tokens", type=int_in_range(1, infer.MAX_NEW_TOKENS),
                        default=infer.DEFAULT_MAX_NEW_TOKENS, help="tokens to generate (%(default)s)")
    parser.add_argument("--temperature", type=float, default=infer.DEFAULT_TEMPERATURE,
                        help="sampling temperature; 0 decodes greedily (%(default)s)")
    parser.add_argument("--top-p", type=float, default=infer.DEFAULT_TOP_P,
                        help="nucleus sampling: keep the likeliest tokens up to this probability (%(default)s)")
    parser.add_argument("--seed", type=int_in_range(0), default=infer.DEFAULT_SEED,
                        help="sampling seed: the same prompt and seed give the same text (%(default)s)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the tokenizer's chat template (default: when it has one)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object at the end (text, or label and probabilities) instead of streaming")
    parser.set_defaults(run=_run_try)


def _run_try(args: argparse.Namespace) -> int:
    from gnlorp.export import chat, infer

    generating = args.text is None
    messages = chat.parse_messages(args.messages) if args.messages is not None else None
    if messages is None:
        infer.check_input(args.prompt if generating else args.text, "prompt" if generating else "text")
    if generating:
        infer.check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model = infer.load_for_try(args.model, base=args.base, task="causal-lm" if generating else "seq-cls")
    if not args.json:
        print(f"gnlorp try: {model.description}", file=sys.stderr)
    if generating:
        pieces = []
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "seed": args.seed}
        stream = (model.chat(messages, **sampling) if messages is not None
                  else model.generate(args.prompt, chat=args.chat, **sampling))
        for piece in stream:
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        print(strict_json({"model": model.description, "text": "".join(pieces)}) if args.json else "")
        return 0
    result = model.classify(args.text)
    if args.json:
        print(strict_json({"model": model.description, "label": result.label, "probabilities": result.probabilities}))
        return 0
    print(result.label)
    width = max(map(len, result.probabilities))
    for name, p in sorted(result.probabilities.items(), key=lambda item: -item[1]):
        print(f"  {name:<{width}}  {p:6.1%}  {'#' * round(p * 40)}")
    return 0
