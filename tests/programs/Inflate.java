// Ground truth for the incident memtrace was born from: zlib Inflaters
// dropped without end() hold native memory until a GC, and once the cleaner
// frees it glibc keeps it in the worker threads' arenas.
//
//   java -XX:+PreserveFramePointer -XX:+UseSerialGC -Xmx256m Inflate DIR
//        [--threads N] [--per-thread M] [--warmup W]
//
// The test drives the phases through files in DIR: the program writes
// NAME.json (renamed into place, so it is complete once it exists) and then
// waits for NAME.go before going on.
//   ready.json   pid and the workers' native tids; the workers are parked
//                (after each made and ended W Inflaters, not counted, so
//                that the JIT compiles inflateOne first: with -Xbatch it
//                is compiled once the warm-up returns)
//   phase1.json  each worker created M Inflaters, inflated a stream through
//                each in small steps (so zlib allocated its state and its
//                32 KiB window with malloc, in the worker's arena) and keeps
//                them all reachable, never calling end(); then it made one
//                more, its "pin", which stays reachable to the end
//   gc.json      the workers dropped the M; System.gc() and runFinalization()
//                ran until every one was found unreachable, then a pause let
//                the JDK's cleaner thread free their native memory
// The pins are the last native blocks of the workers' arenas: they keep the
// freed memory below them from coalescing into the arena's top, so free()
// cannot trim it and the test sees retention whatever order the cleaner
// frees in (a service holds a few Inflaters too).
// After exit.go the program exits. The workers stay alive (a thread pool)
// until then.

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.lang.ref.Cleaner;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.zip.DataFormatException;
import java.util.zip.Deflater;
import java.util.zip.Inflater;

public final class Inflate {
    static final int INPUT_STEP = 256; // compressed bytes per setInput
    static final int OUTPUT_STEP = 1024; // bytes asked per inflate()
    static final long WAIT_LIMIT_NS = 60_000_000_000L;

    final Path dir;
    int threads = 4;
    int perThread = 250;
    int warmup = 0;

    final Cleaner watcher = Cleaner.create();
    final AtomicInteger created = new AtomicInteger();
    final AtomicInteger unreachable = new AtomicInteger();
    final AtomicLong inflatedBytes = new AtomicLong();
    final CountDownLatch start = new CountDownLatch(1);
    final CountDownLatch drop = new CountDownLatch(1);
    final CountDownLatch finish = new CountDownLatch(1);

    Inflate(Path dir) {
        this.dir = dir;
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: Inflate DIR [--threads N] [--per-thread M]");
            System.exit(2);
        }
        Inflate program = new Inflate(Path.of(args[0]));
        for (int i = 1; i < args.length; i++) {
            switch (args[i]) {
                case "--threads": program.threads = Integer.parseInt(args[++i]); break;
                case "--per-thread": program.perThread = Integer.parseInt(args[++i]); break;
                case "--warmup": program.warmup = Integer.parseInt(args[++i]); break;
                default:
                    System.err.println("Inflate: unknown argument " + args[i]);
                    System.exit(2);
            }
        }
        program.run();
        System.exit(0);
    }

    void run() throws Exception {
        byte[] compressed = compress(payload());
        // The first string concatenation links its call site (method
        // handles, classes loaded), which makes the JIT drop code that
        // depended on the classes seen so far: done here, before the
        // workers' warm-up, not by the first publish.
        String linked = "warm-up " + warmup;
        Worker[] workers = new Worker[threads];
        for (int i = 0; i < threads; i++) {
            workers[i] = new Worker(i, compressed);
            workers[i].thread.start();
        }
        for (Worker w : workers) {
            w.started.await();
        }
        StringBuilder json = new StringBuilder();
        json.append("{\"pid\": ").append(ProcessHandle.current().pid())
            .append(", \"compressed_bytes\": ").append(compressed.length)
            .append(", \"workers\": [");
        for (int i = 0; i < threads; i++) {
            json.append(i > 0 ? ", " : "").append("{\"name\": \"").append(workers[i].name)
                .append("\", \"tid\": ").append(workers[i].tid).append('}');
        }
        publish("ready", json.append("]}").toString());
        awaitGo("ready");

        start.countDown();
        for (Worker w : workers) {
            w.inflated.await();
        }
        publish("phase1", "{\"inflaters\": " + created.get() + ", \"pinned\": " + threads
            + ", \"inflated_bytes\": " + inflatedBytes.get() + ", \"threads\": " + threads
            + ", \"per_thread\": " + perThread + "}");
        awaitGo("phase1");

        drop.countDown();
        for (Worker w : workers) {
            w.dropped.await();
        }
        long deadline = System.nanoTime() + WAIT_LIMIT_NS;
        int dropped = threads * perThread;
        while (unreachable.get() < dropped && System.nanoTime() < deadline) {
            System.gc();
            System.runFinalization();
            Thread.sleep(50);
        }
        // Our watcher and the JDK's cleaner are told in the same GC; give the
        // JDK's cleaner thread time to run inflateEnd for every Inflater.
        Thread.sleep(1000);
        publish("gc", "{\"dropped\": " + dropped + ", \"unreachable\": "
            + unreachable.get() + "}");
        awaitGo("gc");
        finish.countDown();
    }

    final class Worker implements Runnable {
        final String name;
        final byte[] compressed;
        final Thread thread;
        final CountDownLatch started = new CountDownLatch(1);
        final CountDownLatch inflated = new CountDownLatch(1);
        final CountDownLatch dropped = new CountDownLatch(1);
        volatile long tid;
        List<Inflater> kept = new ArrayList<>();
        Inflater pin;
        boolean counting; // the warm-up's Inflaters are not

        Worker(int index, byte[] compressed) {
            this.name = "inflate-" + index;
            this.compressed = compressed;
            this.thread = new Thread(this, name);
            this.thread.setDaemon(true);
        }

        @Override
        public void run() {
            try {
                // "/proc/thread-self" -> "PID/task/TID": the native tid.
                tid = Long.parseLong(Files.readSymbolicLink(Path.of("/proc/thread-self"))
                    .getFileName().toString());
                for (int i = 0; i < warmup; i++) {
                    inflateOne().end();
                }
                counting = true;
                started.countDown();
                start.await();
                for (int i = 0; i < perThread; i++) {
                    kept.add(inflateOne());
                }
                pin = inflateOne();
                inflated.countDown();
                drop.await();
                kept = null; // no end(): only the cleaner frees them
                dropped.countDown();
                finish.await();
            } catch (Exception e) {
                e.printStackTrace();
                System.exit(3);
            }
        }

        // Small steps, as a stream reader does; the first output makes zlib
        // allocate its window.
        Inflater inflateOne() throws DataFormatException {
            Inflater inflater = new Inflater();
            // The same code for the warm-up's: what the JIT compiled for
            // them is what runs after.
            boolean counted = counting;
            if (counted) {
                created.incrementAndGet();
            }
            watcher.register(inflater, () -> {
                if (counted) {
                    unreachable.incrementAndGet();
                }
            });
            byte[] out = new byte[OUTPUT_STEP];
            int offset = 0;
            long produced = 0;
            while (!inflater.finished()) {
                if (inflater.needsInput()) {
                    int n = Math.min(INPUT_STEP, compressed.length - offset);
                    if (n == 0) {
                        throw new IllegalStateException("truncated stream");
                    }
                    inflater.setInput(compressed, offset, n);
                    offset += n;
                }
                produced += inflater.inflate(out);
            }
            inflatedBytes.addAndGet(produced);
            return inflater;
        }
    }

    static byte[] payload() {
        StringBuilder text = new StringBuilder();
        for (int i = 0; text.length() < 64 * 1024; i++) {
            text.append("record ").append(i).append(": value=").append((i * 7919) % 10007)
                .append(i % 3 == 0 ? " ok\n" : " retry\n");
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

    void publish(String name, String json) throws IOException {
        Path tmp = dir.resolve(name + ".json.tmp");
        Files.writeString(tmp, json + "\n");
        Files.move(tmp, dir.resolve(name + ".json"), StandardCopyOption.ATOMIC_MOVE);
    }

    void awaitGo(String name) throws InterruptedException {
        Path go = dir.resolve(name + ".go");
        long deadline = System.nanoTime() + WAIT_LIMIT_NS;
        while (!Files.exists(go)) {
            if (System.nanoTime() > deadline) {
                System.err.println("Inflate: " + go + " never came");
                System.exit(4);
            }
            Thread.sleep(20);
        }
    }
}
