/* hash.cl — the counter-based hash (same bits on every device; docs/model.md), included by
 * the kernels that draw: prototype re-seeding (proto.cl) and dropout masks (dropout.cl).
 * Reference: engine.reference.hash_u32. */
#ifndef HASH_CL
#define HASH_CL
inline uint hash_u32(uint seed, uint step, uint t)
{
    uint h = seed * 0x9E3779B1u + step * 0x85EBCA77u + t * 0xC2B2AE3Du + 0x27D4EB2Fu;
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}
#endif
