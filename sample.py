"""
Generate text from a trained checkpoint, with the model's generation cache.

    python sample.py --ckpt out-mixer/ckpt.pt --prompt "Once upon a time" --max_new_tokens 200
"""
import argparse

import torch

from cli import HelpFormatter, load_model, nonneg_float, pick_device, positive_int, run
from data_prep import load_encoding


def sample(args):
    device = pick_device(args.device)
    model, meta = load_model(args.ckpt, device)
    enc = load_encoding(meta)
    torch.manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    for row in out.tolist():
        new = row[len(prompt):]
        if enc.eot_token in new:  # the story ended
            new = new[: new.index(enc.eot_token)]
        text = enc.decode([t for t in new if t < enc.n_vocab])  # padded-vocab ids are no text
        print(args.prompt + text)
        print("-" * 40)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out-mixer/ckpt.pt", help="a checkpoint written by train.py")
    p.add_argument("--prompt", default="Once upon a time",
                   help="text to continue ('' starts a new story)")
    p.add_argument("--max_new_tokens", type=positive_int, default=200)
    p.add_argument("--num_samples", type=positive_int, default=1)
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=positive_int, default=200,
                   help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    run("sample.py", sample, p.parse_args(argv))


if __name__ == "__main__":
    main()
