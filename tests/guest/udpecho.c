/* udpecho: the test guest's UDP echo server (busybox nc has no UDP mode).
 * Usage: udpecho PORT  - answers every datagram to PORT with the same bytes.
 * Built static by tests/guest/image.py and placed at /usr/bin/udpecho in the guest. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6 };
	struct sockaddr_storage peer;
	socklen_t len;
	char buf[65536];
	ssize_t n;
	int off = 0, s;

	if (argc != 2) {
		fprintf(stderr, "usage: udpecho PORT\n");
		return 2;
	}
	s = socket(AF_INET6, SOCK_DGRAM, 0);
	setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
	addr.sin6_port = htons((unsigned short)atoi(argv[1]));
	if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("udpecho");
		return 1;
	}
	for (;;) {
		len = sizeof(peer);
		n = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
		if (n >= 0)
			sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
	}
}
