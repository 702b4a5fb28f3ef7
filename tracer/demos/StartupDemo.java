// memtrace demo "startup": a service-like JVM start, traced from its first
// instruction.
//
// Like an application server booting, it scans the jars on its own class
// path (app.jar with its classes, resources.jar with a few hundred service
// descriptors and templates, both made when the demo was built): first with
// JarFile, which reads the central directory and inflates each entry with
// pooled Inflaters, then with ZipInputStream, which streams the file through
// one Inflater, then it indexes the service descriptors. Under memtrace the
// JVM's own start (class loading, CDS, JIT and GC threads) shows before any
// of it, since tracing begins before the JVM's first instruction.
//
// Ground truth goes to stderr after each phase: jars, entries and bytes read,
// and the two scans must agree.
//
// Usage: startup [--rounds N] [--hold S] [--pause]

import java.io.BufferedInputStream;
import java.io.ByteArrayInputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Enumeration;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.jar.JarEntry;
import java.util.jar.JarFile;
import java.util.zip.ZipEntry;
import java.util.zip.ZipInputStream;

public final class StartupDemo {
    static final String NAME = "startup";

    int rounds = 1;
    double holdSeconds = 0.5;
    boolean pause = false;
    final DemoSupport phases = new DemoSupport(StartupDemo::say);

    // What the service keeps after its start: descriptors and templates.
    final Map<String, Properties> services = new HashMap<>();
    final Map<String, String> templates = new HashMap<>();

    public static void main(String[] args) throws Exception {
        StartupDemo demo = new StartupDemo();
        if (demo.parse(args)) {
            demo.run();
        }
    }

    static void say(String line) {
        System.err.println("[" + NAME + "] " + line);
    }

    static final String USAGE =
        "usage: startup [--rounds N] [--hold S] [--pause]\n"
        + "A service-like start scanning its own jars with JarFile and\n"
        + "ZipInputStream. Ground truth goes to stderr.\n"
        + "  --rounds N   scan the jars N times in each scan phase (default 1)\n"
        + "  --hold S     seconds to stay up once ready (default 0.5)\n"
        + "  --pause      wait for Enter or SIGUSR1 before each phase\n";

    boolean parse(String[] args) {
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--rounds": rounds = (int) DemoSupport.number(args, ++i, 1, 100_000, StartupDemo::say); break;
                case "--hold": holdSeconds = DemoSupport.number(args, ++i, 0, 86400, StartupDemo::say); break;
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

    static void fail(String message) {
        say(message);
        System.exit(2);
    }

    void run() throws Exception {
        long started = System.nanoTime();
        if (pause) {
            phases.pauseBetweenPhases();
        }
        phase("boot", "find the jars on the class path");
        List<Path> jars = ownJars();
        if (jars.isEmpty()) {
            fail("error: no jar on the class path (" + System.getProperty("java.class.path")
                + "); start this demo through 'memtrace demo startup'");
        }
        say("truth boot: pid=" + ProcessHandle.current().pid() + " jars=" + jars.size());

        phase("scan-jarfile", "open each jar with JarFile and read every entry");
        long[] viaJarFile = {0, 0};
        for (int r = 0; r < rounds; r++) {
            viaJarFile = scanWithJarFile(jars);
        }
        say("truth scan-jarfile: entries=" + viaJarFile[0] + " bytes=" + viaJarFile[1]
            + " rounds=" + rounds);

        phase("scan-zipstream", "stream each jar through ZipInputStream");
        long[] viaStream = {0, 0};
        for (int r = 0; r < rounds; r++) {
            viaStream = scanWithZipStream(jars);
        }
        say("truth scan-zipstream: entries=" + viaStream[0] + " bytes=" + viaStream[1]
            + " rounds=" + rounds + " agrees_with_jarfile="
            + (viaStream[0] == viaJarFile[0] && viaStream[1] == viaJarFile[1] ? "yes" : "NO"));

        phase("index", "load service descriptors and templates into memory");
        index(jars);
        long options = 0;
        for (Properties p : services.values()) {
            options += p.size();
        }
        say("truth index: services=" + services.size() + " options=" + options
            + " templates=" + templates.size());

        phase("ready", "the service is up and idle");
        say("truth ready: ms_since_main=" + (System.nanoTime() - started) / 1_000_000
            + " rss_bytes=" + rssBytes());
        Thread.sleep((long) (holdSeconds * 1000));
        say("done");
    }

    static List<Path> ownJars() {
        List<Path> jars = new ArrayList<>();
        for (String part : System.getProperty("java.class.path").split(File.pathSeparator)) {
            if (part.endsWith(".jar")) {
                jars.add(Path.of(part));
            }
        }
        return jars;
    }

    static long[] scanWithJarFile(List<Path> jars) throws IOException {
        long entries = 0;
        long bytes = 0;
        for (Path path : jars) {
            try (JarFile jar = new JarFile(path.toFile())) {
                Enumeration<JarEntry> all = jar.entries();
                while (all.hasMoreElements()) {
                    JarEntry entry = all.nextElement();
                    if (entry.isDirectory()) {
                        continue;
                    }
                    try (InputStream in = jar.getInputStream(entry)) {
                        bytes += in.readAllBytes().length;
                    }
                    entries++;
                }
            }
        }
        return new long[] {entries, bytes};
    }

    static long[] scanWithZipStream(List<Path> jars) throws IOException {
        long entries = 0;
        long bytes = 0;
        for (Path path : jars) {
            try (ZipInputStream zip = new ZipInputStream(
                    new BufferedInputStream(new FileInputStream(path.toFile())))) {
                ZipEntry entry;
                while ((entry = zip.getNextEntry()) != null) {
                    if (entry.isDirectory()) {
                        continue;
                    }
                    bytes += zip.readAllBytes().length;
                    entries++;
                }
            }
        }
        return new long[] {entries, bytes};
    }

    void index(List<Path> jars) throws IOException {
        for (Path path : jars) {
            try (JarFile jar = new JarFile(path.toFile())) {
                Enumeration<JarEntry> all = jar.entries();
                while (all.hasMoreElements()) {
                    JarEntry entry = all.nextElement();
                    String name = entry.getName();
                    if (name.endsWith(".properties")) {
                        byte[] data;
                        try (InputStream in = jar.getInputStream(entry)) {
                            data = in.readAllBytes();
                        }
                        Properties p = new Properties();
                        p.load(new ByteArrayInputStream(data));
                        services.put(name, p);
                    } else if (name.endsWith(".html")) {
                        try (InputStream in = jar.getInputStream(entry)) {
                            templates.put(name, new String(in.readAllBytes(), "UTF-8"));
                        }
                    }
                }
            }
        }
    }

    static long rssBytes() throws IOException {
        String[] f = Files.readString(Path.of("/proc/self/statm")).trim().split("\\s+");
        return Long.parseLong(f[1]) * 4096; // 4 KiB pages: x86-64, Debian's arm64
    }

    void phase(String name, String what) throws InterruptedException {
        phases.phase(name, what);
    }
}
