// linear_attention kernels (not yet implemented).
#include "common.cuh"
