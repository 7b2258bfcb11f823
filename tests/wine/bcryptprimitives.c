/*
 * A stand-in for bcryptprimitives.dll under Wine 8.0 (Debian 12), which
 * lacks it. Rust's standard library (1.78 and later) takes its random
 * bytes from the DLL's ProcessPrng, which Windows 10 and later have; the
 * Windows test (tests/tests/e2e_client.rs) puts this next to knockctl.exe
 * so Wine can load it. It is never shipped: real Windows has the DLL.
 * ProcessPrng here asks advapi32's RtlGenRandom (SystemFunction036),
 * which Wine implements from the host's random source.
 */
#include <windows.h>
#define SystemFunction036 NTAPI SystemFunction036
#include <ntsecapi.h>
#undef SystemFunction036

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
