/* The floor of the hit path: GET of one key over one TCP connection, one request at a
 * time, as little as a client can do (plain socket calls, the bulk reply's length read
 * from its header). Prints the median and p99 round trip in microseconds (each GET
 * timed with CLOCK_MONOTONIC) and the CPU (user + system, getrusage) per GET, as
 * "median_us p99_us cpu_us". redis-benchmark reports its percentiles from a histogram
 * whose buckets near 10 us are several us wide (7 or 15), too coarse for a ratio.
 *
 *   cc -O2 -o c_client c_client.c && ./c_client HOST PORT KEY GETS [USER PASSWORD]
 */
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char reply[1 << 20];

static void fail(const char *what) {
    perror(what);
    exit(1);
}

/* Send `command` and read one whole reply into `reply`; returns its length. */
static size_t round_trip(int fd, const char *command, size_t length) {
    if (write(fd, command, length) != (ssize_t)length) fail("write");
    size_t have = 0, need = 0;
    for (;;) {
        ssize_t got = read(fd, reply + have, sizeof reply - have);
        if (got <= 0) fail("read");
        have += (size_t)got;
        if (!need) {
            char *end = memchr(reply, '\n', have);
            if (!end) continue;
            need = (size_t)(end - reply) + 1;
            if (reply[0] == '$') {
                long size = atol(reply + 1);
                if (size > 0) need += (size_t)size + 2;
            } else if (reply[0] == '-') {
                fprintf(stderr, "error reply: %.*s", (int)need, reply);
                exit(1);
            }
        }
        if (have >= need) return have;
    }
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
    if (argc != 5 && argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT KEY GETS [USER PASSWORD]\n", argv[0]);
        return 2;
    }
    struct addrinfo hints = {0}, *found;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(argv[1], argv[2], &hints, &found) != 0) fail("getaddrinfo");
    int fd = socket(found->ai_family, found->ai_socktype, found->ai_protocol);
    if (fd < 0 || connect(fd, found->ai_addr, found->ai_addrlen) != 0) fail("connect");
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    char command[4096];
    int length;
    if (argc == 7) {
        length = snprintf(command, sizeof command, "*3\r\n$4\r\nAUTH\r\n$%zu\r\n%s\r\n$%zu\r\n%s\r\n",
                          strlen(argv[5]), argv[5], strlen(argv[6]), argv[6]);
        round_trip(fd, command, (size_t)length);
    }
    const char *key = argv[3];
    length = snprintf(command, sizeof command, "*2\r\n$3\r\nGET\r\n$%zu\r\n%s\r\n", strlen(key), key);
    long gets = atol(argv[4]);
    double *took = malloc(sizeof(double) * (size_t)gets);
    for (int i = 0; i < 100; i++) round_trip(fd, command, (size_t)length); /* warm up */
    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    for (long i = 0; i < gets; i++) {
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        round_trip(fd, command, (size_t)length);
        clock_gettime(CLOCK_MONOTONIC, &end);
        took[i] = (end.tv_sec - start.tv_sec) * 1e6 + (end.tv_nsec - start.tv_nsec) / 1e3;
    }
    getrusage(RUSAGE_SELF, &after);
    double cpu = seconds(after.ru_utime) - seconds(before.ru_utime) + seconds(after.ru_stime) -
                 seconds(before.ru_stime);
    qsort(took, (size_t)gets, sizeof(double), by_value);
    printf("%.3f %.3f %.3f\n", took[gets / 2], took[gets * 99 / 100], cpu * 1e6 / gets);
    close(fd);
    return 0;
}
