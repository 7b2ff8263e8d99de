import torch

# The trainer tests run tiny models; on a shared 2-core machine several intra-op threads only
# contend with each other (measured: a 6-step tiny run took 24 s with 2 threads, 1.5 s with 1).
torch.set_num_threads(1)
