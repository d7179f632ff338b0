/* onebyte.c — the process floor for the launch benchmark: a dynamically linked C program that
 * writes one byte to stdout and exits. Launch -> first byte of bulwark minus this is what the
 * monitor and KVM add on top of fork + exec + the dynamic loader on this host. */
#include <unistd.h>

int main(void)
{
    return write(1, "x", 1) == 1 ? 0 : 1;
}
