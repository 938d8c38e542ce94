// maml kernels (not yet implemented).
#include "common.cuh"
