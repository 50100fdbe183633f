"""
Generate text from a trained checkpoint, with the model's generation cache.

    python sample.py --ckpt out-mixer/ckpt.pt --prompt "Once upon a time" --max_new_tokens 200
"""
import argparse
import sys

import torch

from data_prep import DataError, load_encoding
from train import TrainError, load_model, pick_device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out-mixer/ckpt.pt")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        model, meta = load_model(args.ckpt, device)
        enc = load_encoding(meta)
    except (TrainError, DataError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    for row in out.tolist():
        new = row[len(prompt):]
        if enc.eot_token in new:  # the story ended
            new = new[: new.index(enc.eot_token)]
        print(args.prompt + enc.decode([t for t in new if t < enc.n_vocab]))  # padded-vocab ids are no text
        print("-" * 40)


if __name__ == "__main__":
    main()
