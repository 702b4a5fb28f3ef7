// A Go program with cgo (glibc is loaded) whose C side keeps 500 blocks of
// 4096 bytes: tests/integration/test_names.py strips it and checks that its
// frames are named from .gopclntab, as the symbols it was built with name them.
package main

/*
#include <stdlib.h>
#include <string.h>
static void *keep(size_t n) { void *p = malloc(n); memset(p, 1, n); return p; }
*/
import "C"

import (
	"fmt"
	"os"
	"time"
)

var kept []*C.char

//go:noinline
func leakInGo(n int) {
	for i := 0; i < n; i++ {
		kept = append(kept, (*C.char)(C.keep(4096)))
	}
}

func main() {
	leakInGo(500)
	fmt.Println("ready")
	os.Stdout.Sync()
	time.Sleep(1500 * time.Millisecond)
}
