"""The same forwards as benches/vit_forward.rs in PyTorch + timm (fp32, CPU, no grad, eval mode).
Prints one JSON line per model: seconds per batch (median of repeats) and images per second."""
import json, statistics, sys, time
import torch, timm
from timm.models.vision_transformer import VisionTransformer

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
models = [("vit_base_patch16_224", timm.create_model("vit_base_patch16_224", num_classes=0), 8, 224),
          ("vit_pico_patch4_32", VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0), 64, 32)]
for name, m, batch, size in models:
    m.eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for _ in range(2):
            m.forward_features(x)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            m.forward_features(x)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"model": name, "batch": batch, "s_per_batch": med, "img_per_s": batch / med,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}))
