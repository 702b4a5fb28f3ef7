// memtrace reproduction "inflater": the incident this tool was born from.
//
// Worker threads ("inflater-1".."inflater-N", a pool that stays alive)
// create java.util.zip.Inflater objects, inflate data in small steps, so
// zlib allocates its state (~7 KiB) and its 32 KiB window with malloc in the
// worker's own glibc arena, and drop them without end(). The Java objects
// are tiny, so nothing makes the GC run: the native memory stays until a GC
// finds the Inflaters unreachable and the JDK's cleaner thread frees it.
// Then glibc keeps the freed memory in the workers' arenas: RSS stays up.
// --end calls end() on every Inflater: the fix, for comparison.
//
// Ground truth goes to stderr after each phase: Inflaters created, ended,
// dropped and found unreachable (through our own Cleaner, which sees them
// when the JDK's does), and RSS from /proc/self/statm.
//
// Usage: inflater [--threads N] [--per-thread N] [--end] [--hold S] [--pause]

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.lang.ref.Cleaner;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.zip.DataFormatException;
import java.util.zip.Deflater;
import java.util.zip.Inflater;

public final class InflaterDemo {
    static final String NAME = "inflater";
    // zlib's inflate state plus its 32 KiB window, per un-ended Inflater.
    static final long NATIVE_BYTES_PER_INFLATER = 7 * 1024 + 32 * 1024;
    static final int INPUT_STEP = 256; // bytes fed per setInput
    static final int OUTPUT_STEP = 1024; // bytes asked per inflate

    int threads = 4;
    int perThread = 250;
    boolean end = false;
    double holdSeconds = 1.0;
    boolean pause = false;

    final AtomicInteger created = new AtomicInteger();
    final AtomicInteger ended = new AtomicInteger();
    final AtomicInteger unreachable = new AtomicInteger();
    final AtomicLong inflatedBytes = new AtomicLong();
    final Cleaner watcher = Cleaner.create();
    final DemoSupport phases = new DemoSupport(InflaterDemo::say);

    public static void main(String[] args) throws Exception {
        InflaterDemo demo = new InflaterDemo();
        if (!demo.parse(args)) {
            return;
        }
        demo.run();
    }

    static void say(String line) {
        System.err.println("[" + NAME + "] " + line);
    }

    boolean parse(String[] args) {
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--threads": threads = (int) DemoSupport.number(args, ++i, 1, 1024, InflaterDemo::say); break;
                case "--per-thread": perThread = (int) DemoSupport.number(args, ++i, 1, 1_000_000, InflaterDemo::say); break;
                case "--end": end = true; break;
                case "--hold": holdSeconds = DemoSupport.number(args, ++i, 0, 86400, InflaterDemo::say); break;
                case "--pause": pause = true; break;
                case "-h":
                case "--help":
                    System.out.print(USAGE);
                    return false;
                default:
                    fail("unknown option " + args[i] + "\n" + USAGE);
            }
        }
        return true;
    }

    static final String USAGE =
        "usage: inflater [--threads N] [--per-thread N] [--end] [--hold S] [--pause]\n"
        + "Threads drop zlib Inflaters without end(); native memory waits for GC\n"
        + "and then stays in glibc's arenas. Ground truth goes to stderr.\n"
        + "  --threads N     worker threads (default 4)\n"
        + "  --per-thread N  Inflaters each worker creates (default 250)\n"
        + "  --end           call end() on each Inflater (the fix)\n"
        + "  --hold S        seconds to stay in the hold phases (default 1)\n"
        + "  --pause         wait for Enter or SIGUSR1 before each phase\n";

    static void fail(String message) {
        say(message);
        System.exit(2);
    }

    void run() throws Exception {
        if (pause) {
            phases.pauseBetweenPhases();
        }
        say("pid " + ProcessHandle.current().pid() + ": " + threads + " threads x "
            + perThread + " Inflaters, end() " + (end ? "called" : "never called"));

        phase("prepare", "compress the payload every Inflater will read");
        byte[] compressed = compress(payload());
        say("truth prepare: compressed_bytes=" + compressed.length);

        ExecutorService pool = Executors.newFixedThreadPool(threads, namedThreads());
        phase("inflate", "workers inflate in small steps and drop each Inflater"
            + (end ? " after end()" : " without end()"));
        List<Future<?>> work = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            work.add(pool.submit(() -> inflateMany(compressed)));
        }
        for (Future<?> f : work) {
            f.get();
        }
        report("inflate");

        phase("hold", "nothing references the Inflaters; no GC has run");
        Thread.sleep((long) (holdSeconds * 1000));
        report("hold");

        phase("gc", "System.gc(): the cleaner ends unreachable Inflaters, "
            + "free() returns their memory to glibc");
        collect();
        report("gc");

        phase("after-gc", end
            ? "each end() freed at once; compare RSS with a run without --end"
            : "freed, yet the workers' arenas keep the pages: RSS stays");
        Thread.sleep((long) (holdSeconds * 1000));
        report("after-gc");

        pool.shutdown();
        say("done");
    }

    static java.util.concurrent.ThreadFactory namedThreads() {
        AtomicInteger next = new AtomicInteger(1);
        return r -> {
            Thread t = new Thread(r, "inflater-" + next.getAndIncrement());
            t.setDaemon(true);
            return t;
        };
    }

    // Text with some repetition, like the configs and payloads of a service.
    static byte[] payload() {
        StringBuilder text = new StringBuilder();
        for (int i = 0; text.length() < 64 * 1024; i++) {
            text.append("record ").append(i).append(": value=").append((i * 7919) % 10007)
                .append(" status=").append(i % 3 == 0 ? "ok" : "retry").append('\n');
        }
        return text.toString().getBytes(StandardCharsets.US_ASCII);
    }

    static byte[] compress(byte[] data) {
        Deflater deflater = new Deflater();
        try {
            deflater.setInput(data);
            deflater.finish();
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            byte[] buf = new byte[8192];
            while (!deflater.finished()) {
                out.write(buf, 0, deflater.deflate(buf));
            }
            return out.toByteArray();
        } finally {
            deflater.end();
        }
    }

    void inflateMany(byte[] compressed) {
        for (int i = 0; i < perThread; i++) {
            inflateOne(compressed);
        }
    }

    // Small steps, as a stream reader does: setInput a little, inflate a
    // little. The first output makes zlib allocate its 32 KiB window.
    void inflateOne(byte[] compressed) {
        Inflater inflater = new Inflater();
        created.incrementAndGet();
        watcher.register(inflater, unreachable::incrementAndGet);
        byte[] out = new byte[OUTPUT_STEP];
        long produced = 0;
        int offset = 0;
        try {
            while (!inflater.finished()) {
                if (inflater.needsInput()) {
                    int n = Math.min(INPUT_STEP, compressed.length - offset);
                    if (n == 0) {
                        break;
                    }
                    inflater.setInput(compressed, offset, n);
                    offset += n;
                }
                produced += inflater.inflate(out);
            }
        } catch (DataFormatException e) {
            throw new IllegalStateException(e);
        }
        inflatedBytes.addAndGet(produced);
        if (end) {
            inflater.end();
            ended.incrementAndGet();
        }
        // Dropped here: only a GC can free what zlib allocated.
    }

    void collect() throws InterruptedException {
        int dropped = created.get() - ended.get();
        long deadline = System.nanoTime() + 10_000_000_000L;
        do {
            System.gc();
            Thread.sleep(100);
        } while (unreachable.get() < created.get() && System.nanoTime() < deadline);
        // The JDK's cleaner runs on its own thread; give it time to free.
        Thread.sleep(300);
        if (unreachable.get() < dropped) {
            say("warning: only " + unreachable.get() + " of " + dropped
                + " dropped Inflaters were collected within 10 s");
        }
    }

    void report(String phase) throws IOException {
        int notEnded = created.get() - ended.get();
        int pending = Math.max(0, notEnded - unreachable.get());
        long[] rss = rss();
        say("truth " + phase + ": created=" + created.get() + " ended=" + ended.get()
            + " dropped_without_end=" + notEnded + " collected=" + unreachable.get()
            + " native_bytes_pending_gc=" + pending * NATIVE_BYTES_PER_INFLATER
            + " inflated_bytes=" + inflatedBytes.get()
            + " rss_bytes=" + rss[0] + " rss_anon_bytes=" + rss[1]);
    }

    // Resident and anonymous-resident bytes from /proc/self/statm.
    static long[] rss() throws IOException {
        String[] f = Files.readString(Path.of("/proc/self/statm")).trim().split("\\s+");
        long page = 4096; // x86-64, and arm64 as Debian and Ubuntu build it
        long resident = Long.parseLong(f[1]) * page;
        long shared = Long.parseLong(f[2]) * page;
        return new long[] {resident, resident - shared};
    }

    void phase(String name, String what) throws InterruptedException {
        phases.phase(name, what);
    }
}
