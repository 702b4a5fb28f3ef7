// C++'s operators, for allocators that define their own (tcmalloc,
// jemalloc and mimalloc do; they do not go through malloc). One thread
// allocates with new and new[] from two functions, deletes half of each,
// and writes what it did to OUT (JSON, published by rename).
//
// usage: cppnew OUT [--hold-ms N]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

struct Tally {
    long long alloc_bytes = 0, free_bytes = 0, alloc_count = 0, free_count = 0;
};

struct Node {
    char payload[200];
};

__attribute__((noinline)) static Node *alloc_with_new() { return new Node(); }
__attribute__((noinline)) static char *alloc_with_new_array(size_t n) { return new char[n]; }

static void tally_json(FILE *f, const char *name, const Tally &t, bool last)
{
    std::fprintf(f, "\"%s\": {\"live_bytes\": %lld, \"alloc_bytes\": %lld, \"free_bytes\": %lld, "
                    "\"alloc_count\": %lld, \"free_count\": %lld}%s",
                 name, t.alloc_bytes - t.free_bytes, t.alloc_bytes, t.free_bytes, t.alloc_count,
                 t.free_count, last ? "" : ", ");
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 64;
    int hold_ms = argc > 3 && std::strcmp(argv[2], "--hold-ms") == 0 ? std::atoi(argv[3]) : 0;
    Tally nodes, arrays;
    std::vector<Node *> kept_nodes;
    std::vector<char *> kept_arrays;
    for (int i = 0; i < 1000; i++) {
        kept_nodes.push_back(alloc_with_new());
        nodes.alloc_bytes += sizeof(Node);
        nodes.alloc_count++;
        size_t n = 1000 + 8 * (i % 100);
        kept_arrays.push_back(alloc_with_new_array(n));
        arrays.alloc_bytes += n;
        arrays.alloc_count++;
    }
    for (int i = 0; i < 1000; i += 2) {
        delete kept_nodes[i];
        nodes.free_bytes += sizeof(Node);
        nodes.free_count++;
        delete[] kept_arrays[i];
        arrays.free_bytes += 1000 + 8 * (i % 100);
        arrays.free_count++;
    }
    char tmp[4096];
    std::snprintf(tmp, sizeof(tmp), "%s.tmp", argv[1]);
    FILE *f = std::fopen(tmp, "w");
    if (!f)
        return 99;
    std::fprintf(f, "{\"functions\": {");
    tally_json(f, "alloc_with_new", nodes, false);
    tally_json(f, "alloc_with_new_array", arrays, true);
    std::fprintf(f, "}}");
    std::fclose(f);
    std::rename(tmp, argv[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(hold_ms));
    return 0;
}
