/* mktap NAME: creates a persistent tap device (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the flags
 * bulwark opens taps with) that outlives the process, as an operator would with
 * `ip tuntap add NAME mode tap vnet_hdr`; busybox's ip cannot. */
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2 || strlen(argv[1]) >= IFNAMSIZ) {
        fprintf(stderr, "usage: mktap NAME\n");
        return 2;
    }
    int fd = open("/dev/net/tun", O_RDWR);
    if (fd < 0) {
        perror("/dev/net/tun");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strcpy(ifr.ifr_name, argv[1]);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETPERSIST, 1) < 0) {
        perror("TUNSETIFF/TUNSETPERSIST");
        return 1;
    }
    return 0;
}
