import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, ".")
import torch
from ttr_codegen.evaluate import Setting, load_layer, train
spec, vocab, steps, lr, width, pairs, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
folder = Path(tempfile.mkdtemp())
package, name = load_layer(Path(f"./specs/{spec}.yaml"), folder)
losses = []
r = train(package, name, Setting("mqar", pairs, seq, vocab), width, blocks=2, heads=2, steps=steps, batch=64, lr=lr,
          layer_kwargs={"use_short_conv": True}, device="cuda", progress=losses.append)
print(spec, vocab, steps, lr, width, pairs, "acc", round(r["score"], 3), "loss", [round(l, 2) for l in losses[::max(1, steps // 10)]], round(r["seconds"]), "s", flush=True)
