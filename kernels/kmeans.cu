// kmeans kernels (not yet implemented).
#include "common.cuh"
